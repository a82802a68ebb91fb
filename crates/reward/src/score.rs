//! `train score`: the reusable way to evaluate any reward model on a file. Preference pairs give
//! pairwise accuracy (overall and per rating bucket); `{prompt, response}` records give one
//! score each, in file order.

use std::path::Path;

use data::batch::pair_dataset;
use data::{load_source, LengthPolicy, OnError, SourceConfig, Tokenized, Tokenizer, Truncation};
use trainer::{Result, TrainError};

use crate::eval::{score_dataset, PairEval};
use crate::model::RewardModel;
use crate::section::RewardSection;

#[derive(Debug, Clone, PartialEq)]
pub enum ScoreReport {
    Pairs(PairEval),
    /// One score per record, in file order.
    Records(Vec<f64>),
}

/// Scores the records of `data` with a reward model (used without gradients). Prompts are cut
/// from the left to fit `max_seq_len`; a record whose answer alone is too long is an error for
/// single records (every record must get its score) and a counted skip for pairs.
pub fn score_file(
    rm: &RewardModel,
    tokenizer: &Tokenizer,
    data: &Path,
    batch_size: usize,
    max_seq_len: usize,
) -> Result<ScoreReport> {
    let source = SourceConfig::file(data, None);
    let policy = LengthPolicy {
        max_seq_len,
        truncation: Truncation::TruncatePrompt,
        train_on_inputs: false,
    };
    let (items, stats) = load_source(&source, tokenizer, &policy, OnError::Stop)?;
    let tokens: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    match tokens.first() {
        None => Err(TrainError::Invalid(format!(
            "{}: no records to score",
            data.display()
        ))),
        Some(Tokenized::Pair { .. }) => {
            if stats.dropped > 0 {
                eprintln!(
                    "skipped {} pairs longer than {max_seq_len} tokens",
                    stats.dropped
                );
            }
            let pairs = pair_dataset(&tokens);
            let scored = score_dataset(
                &rm.model,
                &pairs,
                batch_size,
                rm.pad,
                &RewardSection::default(),
            )?;
            Ok(ScoreReport::Pairs(PairEval::from_scores(&scored)))
        }
        Some(Tokenized::Sequence(_)) => {
            if stats.dropped > 0 {
                return Err(TrainError::Invalid(format!(
                    "{}: {} records have a response longer than {max_seq_len} tokens on its own",
                    data.display(),
                    stats.dropped
                )));
            }
            let sequences: Vec<Vec<u32>> = tokens
                .into_iter()
                .filter_map(|t| match t {
                    Tokenized::Sequence(r) => Some(r.ids),
                    _ => None,
                })
                .collect();
            Ok(ScoreReport::Records(
                rm.score(&sequences, tokenizer, batch_size)?,
            ))
        }
        Some(Tokenized::Prompt { .. }) => Err(TrainError::Invalid(format!(
            "{}: records need a `response` to score (or `chosen` and `rejected`)",
            data.display()
        ))),
    }
}
