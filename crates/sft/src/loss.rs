//! Token-level cross-entropy averaged over the trained tokens of the whole global batch.
//!
//! Each micro-batch returns the *sum* of its token losses divided by the number of trained
//! tokens in the global batch, so summing micro-batch gradients gives exactly the gradient of
//! the global mean, however the batch is split.

use burn::prelude::*;
use burn::tensor::TensorData;
use data::batch::{SequenceBatch, IGNORE};
use llama::model::token_log_probs;
use llama::{Llama, StepInput};

/// The loss of one micro-batch, scaled by `1 / global_trained_tokens`.
pub fn sft_loss(model: &Llama, batch: &SequenceBatch, global_trained_tokens: usize) -> Tensor<1> {
    let device = model.device();
    let rows = batch.tokens.len();
    let width = batch.tokens.first().map_or(0, Vec::len);
    let input = StepInput {
        tokens: batch.tokens.clone(),
        positions: batch.positions.clone(),
        valid: batch.valid.clone(),
        segments: Some(batch.segments.clone()),
    };
    let logits = model.forward(&input, None);
    let targets: Vec<i64> = batch
        .targets
        .iter()
        .flatten()
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let weights: Vec<f32> = batch
        .targets
        .iter()
        .flatten()
        .map(|&t| if t == IGNORE { 0.0 } else { 1.0 })
        .collect();
    let (picked, _) = token_log_probs(logits, targets, 1.0, usize::MAX);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, width]), &device);
    (picked * weights).sum().neg() / (global_trained_tokens.max(1) as f64)
}
