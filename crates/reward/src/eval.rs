//! Reward-model evaluation: pairwise accuracy overall and per rating bucket, the mean margin
//! `r_chosen - r_rejected`, and the mean and standard deviation of all scores. The mean and
//! standard deviation are saved with every checkpoint (`reward_stats.json`) so PPO can
//! normalise rewards.

use std::collections::BTreeMap;
use std::path::Path;

use crate::section::RewardSection;
use data::batch::{items_at, Dataset, PairBatch, PairDataset};
use data::Rating;
use llama::Llama;
use serde::{Deserialize, Serialize};
use trainer::{io_err, Result, TrainError};

use crate::loss::{batch_scores, pair_margins};

/// One scored pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredPair {
    pub chosen: f32,
    pub rejected: f32,
    pub rating: Option<Rating>,
    pub margin: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketAccuracy {
    pub pairs: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairEval {
    pub pairs: usize,
    /// Fraction of pairs with `r_chosen > r_rejected` (a tie counts as wrong).
    pub accuracy: f64,
    /// By rating name; pairs without a rating are under "unrated".
    pub per_bucket: BTreeMap<String, BucketAccuracy>,
    /// The pairwise loss with margins, as in training (without centering).
    pub loss: f64,
    pub mean_margin: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
}

/// Bucket name of a pair's rating.
pub fn bucket_name(rating: Option<Rating>) -> &'static str {
    rating.map_or("unrated", Rating::name)
}

impl PairEval {
    pub fn from_scores(scored: &[ScoredPair]) -> Self {
        let n = scored.len().max(1) as f64;
        let correct = |p: &ScoredPair| p.chosen > p.rejected;
        let mut buckets: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for pair in scored {
            let entry = buckets
                .entry(bucket_name(pair.rating).to_string())
                .or_default();
            entry.0 += usize::from(correct(pair));
            entry.1 += 1;
        }
        let all: Vec<f64> = scored
            .iter()
            .flat_map(|p| [p.chosen as f64, p.rejected as f64])
            .collect();
        let stats = RewardStats::of(&all);
        let loss = scored
            .iter()
            .map(|p| {
                let x = (p.chosen - p.rejected - p.margin) as f64;
                // -log σ(x), stable for large |x|.
                (-x).max(0.0) + (-x.abs()).exp().ln_1p()
            })
            .sum::<f64>()
            / n;
        PairEval {
            pairs: scored.len(),
            accuracy: scored.iter().filter(|p| correct(p)).count() as f64 / n,
            per_bucket: buckets
                .into_iter()
                .map(|(name, (right, total))| {
                    let accuracy = right as f64 / total as f64;
                    (
                        name,
                        BucketAccuracy {
                            pairs: total,
                            accuracy,
                        },
                    )
                })
                .collect(),
            loss,
            mean_margin: scored
                .iter()
                .map(|p| (p.chosen - p.rejected) as f64)
                .sum::<f64>()
                / n,
            reward_mean: stats.mean,
            reward_std: stats.std,
        }
    }
}

/// Scores every pair of a dataset with a model without gradients (`model.valid()`), in
/// batches of `batch_pairs` pairs. A NaN or infinite score is an error.
pub fn score_dataset(
    model: &Llama,
    dataset: &PairDataset,
    batch_pairs: usize,
    pad: u32,
    section: &RewardSection,
) -> Result<Vec<ScoredPair>> {
    let all: Vec<usize> = (0..dataset.len()).collect();
    let mut scored = Vec::with_capacity(dataset.len());
    for chunk in all.chunks(batch_pairs.max(1)) {
        let items = items_at(dataset, chunk);
        let batch = PairBatch::new(&items, pad);
        let margins = pair_margins(&batch, section);
        let scores = llama::model::finite_to_host(batch_scores(model, &batch), "scores")?;
        let pairs = items.len();
        for i in 0..pairs {
            scored.push(ScoredPair {
                chosen: scores[i],
                rejected: scores[pairs + i],
                rating: batch.ratings[i],
                margin: margins[i],
            });
        }
    }
    Ok(scored)
}

/// Mean and standard deviation of a reward model's scores, as measured on its evaluation data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardStats {
    pub mean: f64,
    pub std: f64,
    pub count: usize,
}

pub const STATS_FILE: &str = "reward_stats.json";

impl RewardStats {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: variance.sqrt(),
            count: values.len(),
        }
    }

    /// The score statistics of an evaluation (both answers of every pair).
    pub fn from_eval(eval: &PairEval) -> Self {
        Self {
            mean: eval.reward_mean,
            std: eval.reward_std,
            count: 2 * eval.pairs,
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATS_FILE);
        let text = serde_json::to_string_pretty(self).expect("stats serialize");
        std::fs::write(&path, text + "\n").map_err(io_err(&path))
    }

    /// The stats saved with a reward model, if any.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(STATS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
    }
}
