//! Datasets (burn-dataset's `Dataset` trait) and padded batches.
//!
//! Batches are host arrays, right-padded; the trainers turn them into tensors on their device.
//! The batch order is computed from the seed and epoch alone, so a resumed run sees the same
//! batches.

use burn::prelude::{Bool, Device, Int, Tensor};
use burn::tensor::TensorData;
pub use burn_dataset::{Dataset, DatasetError};
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

pub struct SequenceDataset {
    items: Vec<SequenceItem>,
}

impl SequenceDataset {
    /// SFT sequences from tokenized examples, packed into `max_len` when `packing`.
    pub fn new(examples: &[Tokenized], max_len: usize, packing: bool) -> Self {
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
        Self { items }
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.items.iter().map(|i| i.ids.len()).collect()
    }
}

impl Dataset<SequenceItem> for SequenceDataset {
    fn get(&self, index: usize) -> Result<SequenceItem, DatasetError> {
        self.items
            .get(index)
            .cloned()
            .ok_or_else(|| out_of_range(index, self.items.len()))
    }

    fn len(&self) -> usize {
        self.items.len()
    }
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
            let pad = width - n;
            let mut tokens = item.ids.clone();
            tokens.extend(std::iter::repeat_n(pad_id, pad));
            let mut valid = vec![true; n];
            valid.extend(std::iter::repeat_n(false, pad));
            let mut positions = item.positions.clone();
            positions.extend(std::iter::repeat_n(0, pad));
            let mut segments = item.segments.clone();
            segments.extend(std::iter::repeat_n(u32::MAX, pad));
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

    /// `[batch, time]` tensors: token ids, the attention mask (true for real tokens) and the
    /// next-token targets (`IGNORE` where no loss is taken).
    pub fn tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Bool>, Tensor<2, Int>) {
        let tokens: Vec<Vec<i64>> = self
            .tokens
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect();
        (
            int_tensor(&tokens, device),
            bool_tensor(&self.valid, device),
            int_tensor(&self.targets, device),
        )
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

pub struct PairDataset {
    items: Vec<PairItem>,
}

impl PairDataset {
    pub fn new(examples: &[Tokenized]) -> Self {
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
        Self { items }
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.items
            .iter()
            .map(|p| p.chosen.len().max(p.rejected.len()))
            .collect()
    }
}

impl Dataset<PairItem> for PairDataset {
    fn get(&self, index: usize) -> Result<PairItem, DatasetError> {
        self.items
            .get(index)
            .cloned()
            .ok_or_else(|| out_of_range(index, self.items.len()))
    }

    fn len(&self) -> usize {
        self.items.len()
    }
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
            let mut tokens = row.clone();
            tokens.resize(width, pad_id);
            let mut valid = vec![true; row.len()];
            valid.resize(width, false);
            batch.last.push(row.len().saturating_sub(1));
            batch.tokens.push(tokens);
            batch.valid.push(valid);
        }
        batch
    }
}

impl PairBatch {
    /// `[2 * pairs, time]` token ids and attention mask, and the `[2 * pairs]` last-token
    /// indices.
    pub fn tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Bool>, Tensor<1, Int>) {
        let tokens: Vec<Vec<i64>> = self
            .tokens
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect();
        let last: Vec<i64> = self.last.iter().map(|&i| i as i64).collect();
        let n = last.len();
        (
            int_tensor(&tokens, device),
            bool_tensor(&self.valid, device),
            Tensor::from_data(TensorData::new(last, [n]), device),
        )
    }
}

fn int_tensor(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

fn bool_tensor(rows: &[Vec<bool>], device: &Device) -> Tensor<2, Bool> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<bool> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
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

fn out_of_range(index: usize, len: usize) -> DatasetError {
    DatasetError::new(crate::DataError::Config(format!(
        "dataset index {index} out of range (length {len})"
    )))
}
