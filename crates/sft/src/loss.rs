//! Token-level cross-entropy averaged over the trained tokens of the whole global batch.
//!
//! Each micro-batch returns the *sum* of its token losses divided by the number of trained
//! tokens in the global batch, so summing micro-batch gradients gives exactly the gradient of
//! the global mean, however the batch is split.
//!
//! With a chunk size, the language-model head and the cross-entropy run `chunk` positions at a
//! time (`trainer::chunked`), so the `[rows, time, vocab]` logits never exist whole.

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use data::batch::{SequenceBatch, IGNORE};
use llama::{Llama, StepInput};
use trainer::chunked::{chunks, model_grads, GradPlan};

/// The loss of one micro-batch, scaled by `1 / global_trained_tokens`, taking the LM head and
/// the loss `chunk` positions at a time (0: at once), for evaluation without gradients.
pub fn sft_eval_loss(
    model: &Llama,
    batch: &SequenceBatch,
    global_trained_tokens: usize,
    chunk: usize,
) -> f64 {
    let hidden = model.hidden_states(&input(batch), None);
    let [rows, width, dim] = hidden.dims();
    chunks(width, chunk)
        .map(|range| {
            let part = hidden.clone().slice([0..rows, range.clone(), 0..dim]);
            let loss = chunk_loss(model, part, batch, range, global_trained_tokens);
            loss.into_scalar::<f32>() as f64
        })
        .sum()
}

/// The loss of one micro-batch (detached) and its gradients, taking the LM head and the loss
/// `plan.chunk` positions at a time (0: all at once), and recomputing each layer in the
/// backward pass with `plan.layerwise`.
pub fn sft_loss_and_grads(
    model: &Llama,
    batch: &SequenceBatch,
    global_trained_tokens: usize,
    plan: GradPlan,
) -> (Tensor<1>, GradientsParams) {
    model_grads(
        model,
        &input(batch),
        plan,
        |hidden| hidden,
        |part, range| chunk_loss(model, part, batch, range, global_trained_tokens),
    )
}

fn input(batch: &SequenceBatch) -> StepInput {
    StepInput {
        tokens: batch.tokens.clone(),
        positions: batch.positions.clone(),
        valid: batch.valid.clone(),
        segments: Some(batch.segments.clone()),
    }
}

/// The summed token loss at `positions` of every row, divided by the global count; `hidden`
/// holds the trunk's output at exactly those positions.
fn chunk_loss(
    model: &Llama,
    hidden: Tensor<3>,
    batch: &SequenceBatch,
    positions: std::ops::Range<usize>,
    global_trained_tokens: usize,
) -> Tensor<1> {
    let device = hidden.device();
    let rows = batch.targets.len();
    let width = positions.len();
    let targets: Vec<i64> = batch
        .targets
        .iter()
        .flat_map(|row| &row[positions.clone()])
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let weights: Vec<f32> = batch
        .targets
        .iter()
        .flat_map(|row| &row[positions.clone()])
        .map(|&t| if t == IGNORE { 0.0 } else { 1.0 })
        .collect();
    let picked = model.target_log_probs(hidden, targets, 1.0, usize::MAX);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, width]), &device);
    (picked * weights).sum().neg() / (global_trained_tokens.max(1) as f64)
}
