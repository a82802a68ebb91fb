//! The training core shared by every trainer. So far: the recipe schema (the TOML contract users
//! and tests rely on) with command-line overrides. Optimizer, schedules, checkpoints and metrics
//! follow with the SFT trainer.

pub mod optim;
pub mod recipe;
pub mod schedule;

pub use recipe::{Recipe, RecipeError};
