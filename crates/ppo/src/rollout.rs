//! Rollouts: prompts with their sampled responses, laid out as right-padded batches, and the
//! per-token quantities PPO needs (log-probabilities, entropy, values) at response positions.
//!
//! In a row `prompt ++ response`, the logits at position `i` predict token `i + 1`, so the
//! response's `L` tokens are predicted at positions `P - 1 .. P - 1 + L` (`P` the prompt
//! length). Those are the "response positions" of every `[rows, time - 1]` tensor here, and the
//! value at position `i` is the value of the state before token `i + 1` is chosen.

use burn::prelude::*;
use burn::tensor::TensorData;
use llama::model::token_log_probs;
use llama::{Llama, Side, StepInput};

/// One prompt and the answer sampled for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// The response ends with EOS (otherwise it hit the length limit).
    pub ended: bool,
    pub category: Option<String>,
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
    /// `time - 1`: the number of next-token positions.
    pub width: usize,
}

pub fn pad_rollouts(rollouts: &[&Rollout], pad: u32) -> Padded {
    let rows: Vec<Vec<u32>> = rollouts.iter().map(|r| r.sequence()).collect();
    let input = StepInput::padded(&rows, pad, Side::Right);
    let time = input.tokens.first().map_or(1, Vec::len);
    Padded {
        input,
        width: time.saturating_sub(1),
    }
}

/// A `[rows, width]` tensor holding `per_token[r]` at row `r`'s response positions, 0 elsewhere.
pub fn scatter(
    rollouts: &[&Rollout],
    per_token: &[&[f64]],
    width: usize,
    device: &Device,
) -> Tensor<2> {
    let mut flat = vec![0.0f32; rollouts.len() * width];
    for (row, (r, values)) in rollouts.iter().zip(per_token).enumerate() {
        let start = row * width + r.first_position();
        for (slot, v) in flat[start..start + values.len()].iter_mut().zip(*values) {
            *slot = *v as f32;
        }
    }
    Tensor::from_data(TensorData::new(flat, [rollouts.len(), width]), device)
}

/// 1 at response positions, 0 elsewhere, `[rows, width]`.
pub fn response_mask(rollouts: &[&Rollout], width: usize, device: &Device) -> Tensor<2> {
    let ones: Vec<Vec<f64>> = rollouts
        .iter()
        .map(|r| vec![1.0; r.response.len()])
        .collect();
    let refs: Vec<&[f64]> = ones.iter().map(Vec::as_slice).collect();
    scatter(rollouts, &refs, width, device)
}

/// Reads row `r`'s response positions out of a `[rows, width]` host array.
pub fn gather_rows(rollouts: &[&Rollout], flat: &[f32], width: usize) -> Vec<Vec<f64>> {
    rollouts
        .iter()
        .enumerate()
        .map(|(row, r)| {
            let start = row * width + r.first_position();
            flat[start..start + r.response.len()]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect()
}

/// Log-probability of each next token under `softmax(logits / temperature)`, the distribution
/// the rollouts were sampled from (over the whole vocabulary, as TRL does: the top-p cut is not
/// part of it) restricted to the first `vocab_limit` ids (those generation may pick),
/// `[rows, width]`; and (when asked) the entropy of each next-token distribution, detached.
pub fn token_logprobs(
    model: &Llama,
    padded: &Padded,
    temperature: f64,
    vocab_limit: usize,
    with_entropy: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let rows = padded.input.tokens.len();
    let width = padded.width;
    let logits = model.forward(&padded.input, None);
    let vocab = logits.dims()[2];
    let targets: Vec<i64> = padded
        .input
        .tokens
        .iter()
        .flat_map(|row| row[1..].iter().map(|&t| t as i64))
        .collect();
    let (picked, log_probs) = token_log_probs(
        logits.slice([0..rows, 0..width, 0..vocab]),
        targets,
        temperature,
        vocab_limit,
    );
    let entropy = with_entropy.then(|| {
        let detached = log_probs.detach();
        (detached.clone().exp() * detached)
            .sum_dim(2)
            .neg()
            .reshape([rows, width])
    });
    (picked, entropy)
}

/// The value model's estimate at each next-token position, `[rows, width]`.
pub fn token_values(model: &Llama, padded: &Padded) -> Tensor<2> {
    let rows = padded.input.tokens.len();
    let values = model.scalar_outputs(model.hidden_states(&padded.input, None));
    values.slice([0..rows, 0..padded.width])
}
