//! Token-level cross-entropy averaged over the trained tokens of the whole global batch.
//!
//! Each micro-batch returns the *sum* of its token losses divided by the number of trained
//! tokens in the global batch, so summing micro-batch gradients gives exactly the gradient of
//! the global mean, however the batch is split.
//!
//! With a chunk size, the language-model head and the cross-entropy run `chunk` positions at a
//! time, so the `[rows, time, vocab]` logits (32000 wide for Llama 2) and their gradient never
//! exist whole: the trunk runs once, its output is cut from the graph, each chunk's backward
//! pass gives the head's gradients and that chunk's share of the output's gradient, and one
//! backward pass of `sum(hidden * d_hidden)` then takes the trunk's. The loss and gradients are
//! those of one pass, to rounding.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorData;
use data::batch::{SequenceBatch, IGNORE};
use llama::model::token_log_probs;
use llama::{Llama, StepInput};

/// The loss of one micro-batch, scaled by `1 / global_trained_tokens`, with its graph (for a
/// backward pass) when the model is on an autodiff device.
pub fn sft_loss(model: &Llama, batch: &SequenceBatch, global_trained_tokens: usize) -> Tensor<1> {
    let hidden = model.hidden_states(&input(batch), None);
    let width = hidden.dims()[1];
    chunk_loss(model, hidden, batch, 0..width, global_trained_tokens)
}

/// [`sft_loss`] taking the LM head and the loss `chunk` positions at a time (0: at once), for
/// evaluation without gradients.
pub fn sft_eval_loss(
    model: &Llama,
    batch: &SequenceBatch,
    global_trained_tokens: usize,
    chunk: usize,
) -> f64 {
    let hidden = model.hidden_states(&input(batch), None);
    let [rows, width, dim] = hidden.dims();
    let chunk = if chunk == 0 { width } else { chunk };
    (0..width)
        .step_by(chunk.max(1))
        .map(|start| {
            let end = (start + chunk).min(width);
            let part = hidden.clone().slice([0..rows, start..end, 0..dim]);
            let loss = chunk_loss(model, part, batch, start..end, global_trained_tokens);
            loss.into_scalar::<f32>() as f64
        })
        .sum()
}

/// The loss of one micro-batch (detached) and its gradients, taking the LM head and the loss
/// `chunk` positions at a time (0: all at once, the same as [`sft_loss`] and its backward pass).
pub fn sft_loss_and_grads(
    model: &Llama,
    batch: &SequenceBatch,
    global_trained_tokens: usize,
    chunk: usize,
) -> (Tensor<1>, GradientsParams) {
    let hidden = model.hidden_states(&input(batch), None);
    let [rows, width, dim] = hidden.dims();
    if chunk == 0 || chunk >= width {
        let loss = chunk_loss(model, hidden, batch, 0..width, global_trained_tokens);
        let grads = GradientsParams::from_grads(loss.backward(), model);
        return (loss.detach(), grads);
    }
    let cut = hidden.clone().detach().require_grad();
    let mut accumulator = GradientsAccumulator::<Llama>::new();
    let mut loss_sum: Option<Tensor<1>> = None;
    let mut d_hidden: Option<Tensor<3>> = None;
    for start in (0..width).step_by(chunk) {
        let end = (start + chunk).min(width);
        let part = cut.clone().slice([0..rows, start..end, 0..dim]);
        let loss = chunk_loss(model, part, batch, start..end, global_trained_tokens);
        let grads = loss.backward();
        if let Some(grad) = cut.grad(&grads) {
            d_hidden = Some(match d_hidden {
                Some(sum) => sum + grad,
                None => grad,
            });
        }
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
        loss_sum = Some(match loss_sum {
            Some(sum) => sum + loss.detach(),
            None => loss.detach(),
        });
    }
    if let Some(d_hidden) = d_hidden {
        let surrogate = (hidden * Tensor::from_inner(d_hidden)).sum();
        accumulator.accumulate(
            model,
            GradientsParams::from_grads(surrogate.backward(), model),
        );
    }
    let loss = loss_sum.expect("a batch has at least one position");
    (loss, accumulator.grads())
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
    let (picked, _) = token_log_probs(model.lm_logits(hidden), targets, 1.0, usize::MAX);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, width]), &device);
    (picked * weights).sum().neg() / (global_trained_tokens.max(1) as f64)
}
