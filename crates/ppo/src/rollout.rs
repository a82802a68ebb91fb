//! Rollouts: prompts with their sampled responses, laid out as right-padded batches, and the
//! per-token quantities PPO needs (log-probabilities, entropy, values) at response positions.
//!
//! In a row `prompt ++ response`, the logits at position `i` predict token `i + 1`, so the
//! response's `L` tokens are predicted at positions `P - 1 .. P - 1 + L` (`P` the prompt
//! length), and the value at position `i` is the value of the state before token `i + 1` is
//! chosen. A batch's per-token tensors `[rows, width]` cover only the positions from the
//! earliest response position of any row ([`Padded::offset`]) to the end: the language-model
//! head, the largest matrix of a small model, never runs on positions no response token is
//! predicted at.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::TensorData;
use llama::{Llama, Side, StepInput};
use trainer::chunked::chunks;

/// One prompt and the answer sampled for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// The response ends with EOS (otherwise it hit the length limit).
    pub ended: bool,
    pub category: Option<String>,
    /// Each response token's log-probability under the sampling policy, as generation drew it
    /// (PPO's old log-probabilities).
    pub logprobs: Vec<f64>,
    /// The sampling policy's entropy, summed over the response's tokens (a metric).
    pub entropy: f64,
}

impl Rollout {
    /// First response position (see the module documentation).
    pub fn first_position(&self) -> usize {
        self.prompt.len() - 1
    }

    pub fn sequence(&self) -> Vec<u32> {
        let mut ids = self.prompt.clone();
        ids.extend_from_slice(&self.response);
        ids
    }
}

/// Rollouts as one right-padded batch.
pub struct Padded {
    pub input: StepInput,
    /// The earliest response position of any row: column 0 of the batch's per-token tensors.
    pub offset: usize,
    /// `time - 1 - offset`: the next-token positions from `offset` on.
    pub width: usize,
}

impl Padded {
    /// Column of row `r`'s first response token in the per-token tensors.
    fn column(&self, r: &Rollout) -> usize {
        r.first_position() - self.offset
    }
}

pub fn pad_rollouts(rollouts: &[&Rollout], pad: u32) -> Padded {
    let rows: Vec<Vec<u32>> = rollouts.iter().map(|r| r.sequence()).collect();
    let input = StepInput::padded(&rows, pad, Side::Right);
    let time = input.tokens.first().map_or(1, Vec::len);
    let offset = rollouts
        .iter()
        .map(|r| r.first_position())
        .min()
        .unwrap_or(0);
    Padded {
        input,
        offset,
        width: time.saturating_sub(1 + offset),
    }
}

/// A `[rows, width]` tensor holding `per_token[r]` at row `r`'s response positions, 0 elsewhere.
pub fn scatter(
    rollouts: &[&Rollout],
    per_token: &[&[f64]],
    padded: &Padded,
    device: &Device,
) -> Tensor<2> {
    let width = padded.width;
    let mut flat = vec![0.0f32; rollouts.len() * width];
    for (row, (r, values)) in rollouts.iter().zip(per_token).enumerate() {
        let start = row * width + padded.column(r);
        for (slot, v) in flat[start..start + values.len()].iter_mut().zip(*values) {
            *slot = *v as f32;
        }
    }
    Tensor::from_data(TensorData::new(flat, [rollouts.len(), width]), device)
}

/// 1 at response positions, 0 elsewhere, `[rows, width]`.
pub fn response_mask(rollouts: &[&Rollout], padded: &Padded, device: &Device) -> Tensor<2> {
    let ones: Vec<Vec<f64>> = rollouts
        .iter()
        .map(|r| vec![1.0; r.response.len()])
        .collect();
    let refs: Vec<&[f64]> = ones.iter().map(Vec::as_slice).collect();
    scatter(rollouts, &refs, padded, device)
}

/// Reads row `r`'s response positions out of a `[rows, width]` host array.
pub fn gather_rows(rollouts: &[&Rollout], flat: &[f32], padded: &Padded) -> Vec<Vec<f64>> {
    rollouts
        .iter()
        .enumerate()
        .map(|(row, r)| {
            let start = row * padded.width + padded.column(r);
            flat[start..start + r.response.len()]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect()
}

/// Log-probability of each next token under `softmax(logits / temperature)`, the distribution
/// the rollouts were sampled from (over the whole vocabulary, as TRL does: the top-p cut is not
/// part of it) restricted to the first `vocab_limit` ids (those generation may pick), at the
/// batch's response positions, `[rows, width]`. The language-model head runs `chunk` positions
/// at a time (0: all at once).
pub fn token_logprobs(
    model: &Llama,
    padded: &Padded,
    temperature: f64,
    vocab_limit: usize,
    chunk: usize,
) -> Tensor<2> {
    let hidden = next_token_states(model, padded);
    let [rows, width, dim] = hidden.dims();
    let picked = chunks(width, chunk)
        .map(|range| {
            let part = hidden.clone().slice([0..rows, range.clone(), 0..dim]);
            chunk_logprobs(model, part, padded, range, temperature, vocab_limit)
        })
        .collect();
    Tensor::cat(picked, 1)
}

/// The final hidden states at the batch's response positions, `[rows, width, hidden]`, with
/// their graph when the model has one.
pub fn next_token_states(model: &Llama, padded: &Padded) -> Tensor<3> {
    next_token_slice(model.hidden_states(&padded.input, None), padded)
}

/// The final hidden states at the batch's response positions (`offset .. offset + width`).
pub fn next_token_slice(hidden: Tensor<3>, padded: &Padded) -> Tensor<3> {
    let [rows, _, dim] = hidden.dims();
    hidden.slice([0..rows, padded.offset..padded.offset + padded.width, 0..dim])
}

/// [`token_logprobs`] at the columns `range` of the batch's per-token tensors, from their
/// hidden states `part`.
pub fn chunk_logprobs(
    model: &Llama,
    part: Tensor<3>,
    padded: &Padded,
    range: Range<usize>,
    temperature: f64,
    vocab_limit: usize,
) -> Tensor<2> {
    let first = padded.offset + range.start + 1;
    let targets: Vec<i64> = padded
        .input
        .tokens
        .iter()
        .flat_map(|row| row[first..first + range.len()].iter().map(|&t| t as i64))
        .collect();
    model.target_log_probs(part, targets, temperature, vocab_limit)
}

/// The value model's estimate at each of the batch's response positions, `[rows, width]`.
pub fn token_values(model: &Llama, padded: &Padded) -> Tensor<2> {
    model.scalar_outputs(next_token_states(model, padded))
}
