//! Token-level cross-entropy averaged over the trained tokens of the whole global batch.
//!
//! Each micro-batch returns the *sum* of its token losses divided by the number of trained
//! tokens in the global batch, so summing micro-batch gradients gives exactly the gradient of
//! the global mean, however the batch is split.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;
use data::batch::{SequenceBatch, IGNORE};
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
    let log_probs = log_softmax(logits, 2);

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
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [rows, width, 1]), &device);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, width]), &device);
    let picked = log_probs.gather(2, targets).reshape([rows, width]);
    (picked * weights).sum().neg() / (global_trained_tokens.max(1) as f64)
}
