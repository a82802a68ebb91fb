//! Supervised fine-tuning. So far: the loss, with the normalisation that makes gradient
//! accumulation exact. The training loop follows.

pub mod loss;
