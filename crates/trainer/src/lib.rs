//! The training core shared by every trainer: the recipe schema (the TOML contract users and
//! tests rely on) with command-line overrides, the optimizer and its parameter selection,
//! learning-rate schedules, metrics, and the output directory with its checkpoints.

pub mod metrics;
pub mod optim;
pub mod output;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod step;

pub use recipe::{Recipe, RecipeError};
pub use run::{RunOptions, TrainError, TrainerState};
