//! The training core shared by every trainer: the recipe schema (the TOML contract users and
//! tests rely on) with command-line overrides and a place for each method's own section, the
//! training session (setup, then one loop), the optimizer and its parameter selection,
//! learning-rate schedules, metrics, and the output directory with its checkpoints. It knows no
//! method.

pub mod checkpoint;
pub mod chunked;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod recipe;
pub mod schedule;
pub mod session;
pub mod step;

pub use checkpoint::TrainerState;
pub use error::{io_err, Result, TrainError};
pub use memory::{MemoryPlan, Pass};
pub use recipe::{Recipe, RecipeError, Section};
pub use session::{Run, RunOptions, Session, Summary};
