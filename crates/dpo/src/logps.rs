//! Sequence log-probabilities of the answers of preference pairs, and their gradients.
//!
//! Each pair is two language-modelling rows, prompt + chosen and prompt + rejected, with the
//! same trained masks SFT uses (the answer's tokens, never the prompt's); a sequence's
//! log-probability is the sum of its answer tokens' log-probabilities. The language-model head
//! runs a chunk of positions at a time (`train.loss_chunk`), as in SFT.
//!
//! DPO's loss is not a sum over positions, so its gradient is taken in two steps on one trunk
//! pass: the sequence log-probabilities `S` are read first (the head on the detached final
//! hidden states), the loss's derivative `w = dL/dS` is computed from them on the host, and the
//! backward pass is that of `Σ w · S`, which is a sum over positions and so runs through the
//! chunked head (and activation checkpointing) like the SFT loss. Its gradient is the loss's.

use std::cell::RefCell;
use std::ops::Range;

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use data::batch::{InMemDataset, Length, SequenceBatch, SequenceItem, IGNORE};
use data::Tokenized;
use llama::model::to_host;
use llama::{Llama, StepInput};
use trainer::chunked::{chunks, model_grads, GradPlan};

/// A preference pair as two trained sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoItem {
    pub chosen: SequenceItem,
    pub rejected: SequenceItem,
}

impl Length for DpoItem {
    fn length(&self) -> usize {
        self.chosen.ids.len().max(self.rejected.ids.len())
    }
}

pub type DpoDataset = InMemDataset<DpoItem>;

fn sequence(rendered: &data::chat::Rendered) -> SequenceItem {
    let n = rendered.ids.len();
    SequenceItem {
        ids: rendered.ids.clone(),
        trained: rendered.trained.clone(),
        positions: (0..n).collect(),
        segments: vec![0; n],
    }
}

/// The pairs among tokenized examples (ratings and margins are not used by DPO).
pub fn dpo_dataset(examples: &[Tokenized]) -> DpoDataset {
    let items = examples
        .iter()
        .filter_map(|t| match t {
            Tokenized::Pair {
                chosen, rejected, ..
            } => Some(DpoItem {
                chosen: sequence(chosen),
                rejected: sequence(rejected),
            }),
            _ => None,
        })
        .collect();
    InMemDataset::new(items)
}

/// Pairs in one right-padded batch: rows `0..n` the chosen answers, rows `n..2n` the rejected.
pub struct DpoBatch {
    pub sequences: SequenceBatch,
    /// Answer tokens of each row (the positions that carry a target).
    pub tokens: Vec<usize>,
    pub pairs: usize,
}

impl DpoBatch {
    pub fn new(items: &[DpoItem], pad: u32) -> Self {
        let rows: Vec<SequenceItem> = items
            .iter()
            .map(|p| p.chosen.clone())
            .chain(items.iter().map(|p| p.rejected.clone()))
            .collect();
        let sequences = SequenceBatch::new(&rows, pad);
        let tokens = sequences
            .targets
            .iter()
            .map(|row| row.iter().filter(|&&t| t != IGNORE).count())
            .collect();
        Self {
            sequences,
            tokens,
            pairs: items.len(),
        }
    }

    /// Row `row`'s pair as `[chosen, rejected]` out of per-row values.
    pub fn pair(&self, values: &[f64], pair: usize) -> [f64; 2] {
        [values[pair], values[self.pairs + pair]]
    }

    /// The batch as the model's input.
    pub fn input(&self) -> StepInput {
        let b = &self.sequences;
        StepInput {
            tokens: b.tokens.clone(),
            positions: b.positions.clone(),
            valid: b.valid.clone(),
            segments: Some(b.segments.clone()),
        }
    }

    /// `[rows, positions]` of `weight[row]` where a position carries a target, 0 elsewhere;
    /// and the targets (0 where none), for the positions `range`.
    fn targets(
        &self,
        range: Range<usize>,
        weight: &[f64],
        device: &Device,
    ) -> (Vec<i64>, Tensor<2>) {
        let rows = self.sequences.targets.len();
        let mut ids = Vec::with_capacity(rows * range.len());
        let mut weights = Vec::with_capacity(rows * range.len());
        for (row, targets) in self.sequences.targets.iter().enumerate() {
            for &t in &targets[range.clone()] {
                ids.push(if t == IGNORE { 0 } else { t });
                weights.push(if t == IGNORE { 0.0 } else { weight[row] as f32 });
            }
        }
        let weights = Tensor::from_data(TensorData::new(weights, [rows, range.len()]), device);
        (ids, weights)
    }
}

/// `Σ weight[row] · log p(target)` over the targets of positions `range` of each row, `[rows]`
/// summed to one value per row (`[rows, 1]`); `hidden` holds those positions' final states.
fn weighted_logps(
    model: &Llama,
    hidden: Tensor<3>,
    batch: &DpoBatch,
    range: Range<usize>,
    weight: &[f64],
) -> Tensor<2> {
    let (targets, weights) = batch.targets(range, weight, &hidden.device());
    let picked = model.target_log_probs(hidden, targets, 1.0, usize::MAX);
    (picked * weights).sum_dim(1)
}

/// Each row's answer log-probability from the final hidden states (read without gradients),
/// the head run `chunk` positions at a time.
fn row_logps(model: &Llama, hidden: Tensor<3>, batch: &DpoBatch, chunk: usize) -> Vec<f64> {
    // Without autodiff: a read records no graph (the policy's head would record one per chunk).
    let model = &model.valid();
    let hidden = hidden.inner();
    let [rows, width, dim] = hidden.dims();
    let ones = vec![1.0; rows];
    let mut total: Option<Tensor<2>> = None;
    for range in chunks(width, chunk) {
        let part = hidden.clone().slice([0..rows, range.clone(), 0..dim]);
        let sums = weighted_logps(model, part, batch, range, &ones);
        total = Some(match total {
            Some(t) => t + sums,
            None => sums,
        });
    }
    total.map_or_else(
        || vec![0.0; rows],
        |t| to_host(t).into_iter().map(f64::from).collect(),
    )
}

/// Each row's answer log-probability under `model` (a model without autodiff: the reference,
/// or the policy for evaluation).
pub fn sequence_logps(model: &Llama, batch: &DpoBatch, chunk: usize) -> Vec<f64> {
    let hidden = model.hidden_states(&batch.input(), None);
    row_logps(model, hidden, batch, chunk)
}

/// Each row's answer log-probability under `model` (with autodiff) and the gradients of
/// `Σ w[row] · logp[row]`, where `loss_weights` gives `w` from the log-probabilities (a
/// loss's derivative with respect to each, so the gradients are the loss's). `plan` says how
/// the gradients are taken (chunked head, recomputed layers, LoRA dropout).
pub fn logps_and_grads(
    model: &Llama,
    batch: &DpoBatch,
    plan: GradPlan,
    loss_weights: impl Fn(&[f64]) -> Vec<f64>,
) -> (Vec<f64>, GradientsParams) {
    let logps = RefCell::new(Vec::new());
    let weights = RefCell::new(Vec::new());
    let (_, grads) = model_grads(
        model,
        &batch.input(),
        plan,
        |hidden| {
            let read = row_logps(model, hidden.clone(), batch, plan.chunk);
            *weights.borrow_mut() = loss_weights(&read);
            *logps.borrow_mut() = read;
            hidden
        },
        |part, range| weighted_logps(model, part, batch, range, &weights.borrow()).sum(),
    );
    (logps.into_inner(), grads)
}
