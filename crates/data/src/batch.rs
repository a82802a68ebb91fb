//! Datasets (burn-dataset's in-memory `Dataset`) and padded batches.
//!
//! Batches are host arrays, right-padded; the trainers turn them into tensors on their device.
//! The batch order is computed from the seed and epoch alone, so a resumed run sees the same
//! batches.

pub use burn_dataset::{Dataset, DatasetError, InMemDataset};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::chat::Rendered;
use crate::format::Rating;
use crate::render::{pack, Packed, Tokenized};

/// Target id of positions that carry no loss.
pub const IGNORE: i64 = -100;

/// A language-modelling sequence (one example, or several packed).
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceItem {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// RoPE positions: restart at every packed example.
    pub positions: Vec<usize>,
    pub segments: Vec<u32>,
}

impl From<Packed> for SequenceItem {
    fn from(p: Packed) -> Self {
        Self {
            ids: p.ids,
            trained: p.trained,
            positions: p.positions,
            segments: p.segments,
        }
    }
}

/// SFT sequences in memory.
pub type SequenceDataset = InMemDataset<SequenceItem>;

/// SFT sequences from tokenized examples, packed into `max_len` when `packing`.
pub fn sequence_dataset(examples: &[Tokenized], max_len: usize, packing: bool) -> SequenceDataset {
    let sequences: Vec<Rendered> = examples
        .iter()
        .filter_map(|t| match t {
            Tokenized::Sequence(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let items = if packing {
        pack(&sequences, max_len)
            .into_iter()
            .map(Into::into)
            .collect()
    } else {
        sequences
            .into_iter()
            .map(|r| SequenceItem {
                positions: (0..r.ids.len()).collect(),
                segments: vec![0; r.ids.len()],
                ids: r.ids,
                trained: r.trained,
            })
            .collect()
    };
    InMemDataset::new(items)
}

/// An item's length in tokens, what batches are bucketed by (a pair: its longer answer).
pub trait Length {
    fn length(&self) -> usize;
}

impl Length for SequenceItem {
    fn length(&self) -> usize {
        self.ids.len()
    }
}

impl Length for PairItem {
    fn length(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }
}

/// Every item's length, in order.
pub fn lengths<I: Length + Clone + Send + Sync>(dataset: &InMemDataset<I>) -> Vec<usize> {
    dataset
        .iter()
        .map(|item| item.expect("in-memory items always read").length())
        .collect()
}

/// `row` followed by `fill` up to `width`: the one right-padding of host batches.
fn pad_to<T: Clone>(row: &[T], width: usize, fill: T) -> Vec<T> {
    let mut padded = row.to_vec();
    padded.resize(width.max(row.len()), fill);
    padded
}

/// A right-padded language-modelling batch. `targets[b][t]` is the token to predict at
/// position t (the next id when that id is trained), `IGNORE` elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceBatch {
    pub tokens: Vec<Vec<u32>>,
    pub valid: Vec<Vec<bool>>,
    pub positions: Vec<Vec<usize>>,
    pub segments: Vec<Vec<u32>>,
    pub targets: Vec<Vec<i64>>,
}

impl SequenceBatch {
    pub fn new(items: &[SequenceItem], pad_id: u32) -> Self {
        let width = items.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        let mut batch = SequenceBatch {
            tokens: Vec::new(),
            valid: Vec::new(),
            positions: Vec::new(),
            segments: Vec::new(),
            targets: Vec::new(),
        };
        for item in items {
            let n = item.ids.len();
            let tokens = pad_to(&item.ids, width, pad_id);
            let valid = pad_to(&vec![true; n], width, false);
            let positions = pad_to(&item.positions, width, 0);
            let segments = pad_to(&item.segments, width, u32::MAX);
            // Predict token t+1 at t, within the same packed example only.
            let mut targets = vec![IGNORE; width];
            for (t, target) in targets.iter_mut().enumerate().take(n.saturating_sub(1)) {
                if item.trained[t + 1] && item.segments[t + 1] == item.segments[t] {
                    *target = item.ids[t + 1] as i64;
                }
            }
            batch.tokens.push(tokens);
            batch.valid.push(valid);
            batch.positions.push(positions);
            batch.segments.push(segments);
            batch.targets.push(targets);
        }
        batch
    }

    /// Number of positions that carry loss.
    pub fn trained_tokens(&self) -> usize {
        self.targets
            .iter()
            .flatten()
            .filter(|&&t| t != IGNORE)
            .count()
    }
}

/// A preference pair ready for a reward model.
#[derive(Debug, Clone, PartialEq)]
pub struct PairItem {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub prompt_len: usize,
    pub rating: Option<Rating>,
    pub margin: Option<f32>,
}

/// Preference pairs in memory.
pub type PairDataset = InMemDataset<PairItem>;

/// The pairs among tokenized examples.
pub fn pair_dataset(examples: &[Tokenized]) -> PairDataset {
    let items = examples
        .iter()
        .filter_map(|t| match t {
            Tokenized::Pair {
                chosen,
                rejected,
                prompt_len,
                rating,
                margin,
            } => Some(PairItem {
                chosen: chosen.ids.clone(),
                rejected: rejected.ids.clone(),
                prompt_len: *prompt_len,
                rating: *rating,
                margin: *margin,
            }),
            _ => None,
        })
        .collect();
    InMemDataset::new(items)
}

/// Chosen and rejected sequences in one right-padded batch: rows `0..n` are the chosen answers,
/// rows `n..2n` the rejected ones. `last[row]` is the index of the row's last real token, where
/// a reward model reads its score (never a pad position).
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    pub tokens: Vec<Vec<u32>>,
    pub valid: Vec<Vec<bool>>,
    pub last: Vec<usize>,
    pub ratings: Vec<Option<Rating>>,
    pub margins: Vec<Option<f32>>,
}

impl PairBatch {
    pub fn new(items: &[PairItem], pad_id: u32) -> Self {
        let rows: Vec<&Vec<u32>> = items
            .iter()
            .map(|p| &p.chosen)
            .chain(items.iter().map(|p| &p.rejected))
            .collect();
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut batch = PairBatch {
            tokens: Vec::new(),
            valid: Vec::new(),
            last: Vec::new(),
            ratings: items.iter().map(|p| p.rating).collect(),
            margins: items.iter().map(|p| p.margin).collect(),
        };
        for row in rows {
            batch.last.push(row.len().saturating_sub(1));
            batch.tokens.push(pad_to(row, width, pad_id));
            batch
                .valid
                .push(pad_to(&vec![true; row.len()], width, false));
        }
        batch
    }
}

/// The order of batches for one epoch: indices shuffled with `seed` and `epoch`; with
/// `bucket`, each window of 50 batches is sorted by length before being cut into batches, so
/// batches hold similar lengths, and the batches are shuffled again. The last incomplete batch
/// is kept.
pub fn batch_order(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    bucket: bool,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng =
        StdRng::seed_from_u64(seed.wrapping_add(epoch.wrapping_mul(0x2545_f491_4f6c_dd1d)));
    let mut indices: Vec<usize> = (0..lengths.len()).collect();
    indices.shuffle(&mut rng);
    if bucket {
        for window in indices.chunks_mut(batch_size * 50) {
            // Stable: equal lengths keep their shuffled order.
            window.sort_by_key(|&i| lengths[i]);
        }
    }
    let mut batches: Vec<Vec<usize>> = indices.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if bucket {
        batches.shuffle(&mut rng);
    }
    batches
}

/// The items at `indices` (positions from `batch_order` or `0..len`, so always in range).
pub fn items_at<I>(dataset: &impl Dataset<I>, indices: &[usize]) -> Vec<I> {
    dataset
        .get_many(indices.to_vec())
        .expect("batch indices are taken from the dataset's own length")
}
