//! `train score`: the reusable way to evaluate any reward model on a file. Preference pairs give
//! pairwise accuracy (overall and per rating bucket); `{prompt, response}` records give one
//! score each, in file order.

use std::path::Path;

use data::batch::PairDataset;
use data::{load_source, LengthPolicy, OnError, SourceConfig, Tokenized, Tokenizer, Truncation};
use llama::{Head, Llama, LlamaConfig, StepInput};
use trainer::recipe::RewardSection;
use trainer::run::{Result, TrainError};

use crate::eval::{score_dataset, PairEval};
use crate::train::reward_pad_id;

#[derive(Debug, Clone, PartialEq)]
pub enum ScoreReport {
    Pairs(PairEval),
    /// One score per record, in file order.
    Records(Vec<f64>),
}

/// Loads a reward model directory; a model without a scalar head is refused.
pub fn load_reward_model(
    dir: &Path,
    device: &burn::prelude::Device,
) -> Result<(LlamaConfig, Llama)> {
    let (config, model) = llama::load_pretrained(dir, device)?;
    if model.head() != Head::Score {
        return Err(TrainError::Invalid(format!(
            "{}: not a reward model (no scalar `score` head); train one with `train reward`",
            dir.display()
        )));
    }
    Ok((config, model))
}

/// Scores the records of `data` with a reward model (used without gradients). Prompts are cut
/// from the left to fit `max_seq_len`; a record whose answer alone is too long is an error for
/// single records (every record must get its score) and a counted skip for pairs.
pub fn score_file(
    model: &Llama,
    config: &LlamaConfig,
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
    let pad = reward_pad_id(config);
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
            let pairs = PairDataset::new(&tokens);
            let scored = score_dataset(model, &pairs, batch_size, pad, &RewardSection::default())?;
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
            Ok(ScoreReport::Records(score_sequences(
                model, &sequences, batch_size, pad,
            )?))
        }
        Some(Tokenized::Prompt { .. }) => Err(TrainError::Invalid(format!(
            "{}: records need a `response` to score (or `chosen` and `rejected`)",
            data.display()
        ))),
    }
}

/// Scores of whole sequences, read at each one's last token, in batches (right-padded). A NaN
/// or infinite score is an error.
pub fn score_sequences(
    model: &Llama,
    sequences: &[Vec<u32>],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<f64>> {
    let mut scores = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let width = chunk.iter().map(Vec::len).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(chunk.len());
        let mut valid = Vec::with_capacity(chunk.len());
        for row in chunk {
            let mut padded = row.clone();
            padded.resize(width, pad);
            let mut mask = vec![true; row.len()];
            mask.resize(width, false);
            tokens.push(padded);
            valid.push(mask);
        }
        let starts = vec![0; chunk.len()];
        let input = StepInput::from_padded(tokens, valid, &starts);
        scores.extend(
            llama::model::finite_to_host(model.last_token_scores(&input), "scores")?
                .into_iter()
                .map(f64::from),
        );
    }
    Ok(scores)
}
