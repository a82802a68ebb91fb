//! Supervised fine-tuning: the loss (normalised so gradient accumulation is exact) and the
//! training loop behind `train sft --recipe`.

pub mod loss;
pub mod train;
