//! Rollouts: prompts with their sampled responses, laid out as right-padded batches, and the
//! per-token quantities PPO needs (log-probabilities, entropy, values) at response positions.
//!
//! In a row `prompt ++ response`, the logits at position `i` predict token `i + 1`, so the
//! response's `L` tokens are predicted at positions `P - 1 .. P - 1 + L` (`P` the prompt
//! length). Those are the "response positions" of every `[rows, time - 1]` tensor here, and the
//! value at position `i` is the value of the state before token `i + 1` is chosen.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::TensorData;
use llama::model::token_log_probs;
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
/// `[rows, width]`; and (when asked) the entropy of each next-token distribution, detached. The
/// language-model head runs `chunk` positions at a time (0: all at once).
pub fn token_logprobs(
    model: &Llama,
    padded: &Padded,
    temperature: f64,
    vocab_limit: usize,
    with_entropy: bool,
    chunk: usize,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let hidden = next_token_states(model, padded);
    let [rows, width, dim] = hidden.dims();
    let mut picked = Vec::new();
    let mut entropies = Vec::new();
    for range in chunks(width, chunk) {
        let part = hidden.clone().slice([0..rows, range.clone(), 0..dim]);
        let (logp, log_probs) =
            chunk_logprobs(model, part, padded, range, temperature, vocab_limit);
        picked.push(logp);
        if with_entropy {
            let detached = log_probs.detach();
            let [_, positions, _] = detached.dims();
            entropies.push(
                (detached.clone().exp() * detached)
                    .sum_dim(2)
                    .neg()
                    .reshape([rows, positions]),
            );
        }
    }
    let entropy = with_entropy.then(|| Tensor::cat(entropies, 1));
    (Tensor::cat(picked, 1), entropy)
}

/// The final hidden states at the next-token positions, `[rows, width, hidden]`, with their
/// graph when the model has one.
pub fn next_token_states(model: &Llama, padded: &Padded) -> Tensor<3> {
    next_token_slice(model.hidden_states(&padded.input, None), padded.width)
}

/// The first `width` positions of final hidden states: those that predict a next token.
pub fn next_token_slice(hidden: Tensor<3>, width: usize) -> Tensor<3> {
    let [rows, _, dim] = hidden.dims();
    hidden.slice([0..rows, 0..width, 0..dim])
}

/// [`token_logprobs`] at the next-token positions `range`, from their hidden states `part`;
/// also the whole log-softmax `[rows, positions, vocab]`.
pub fn chunk_logprobs(
    model: &Llama,
    part: Tensor<3>,
    padded: &Padded,
    range: Range<usize>,
    temperature: f64,
    vocab_limit: usize,
) -> (Tensor<2>, Tensor<3>) {
    let targets: Vec<i64> = padded
        .input
        .tokens
        .iter()
        .flat_map(|row| {
            row[range.start + 1..range.end + 1]
                .iter()
                .map(|&t| t as i64)
        })
        .collect();
    token_log_probs(model.lm_logits(part), targets, temperature, vocab_limit)
}

/// The value model's estimate at each next-token position, `[rows, width]`.
pub fn token_values(model: &Llama, padded: &Padded) -> Tensor<2> {
    let rows = padded.input.tokens.len();
    let values = model.scalar_outputs(model.hidden_states(&padded.input, None));
    values.slice([0..rows, 0..padded.width])
}
