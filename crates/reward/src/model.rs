//! A reward model in use, the one type every method scores with (`train score`, PPO, rejection
//! sampling, distillation, the safety evaluation): loaded from its directory with a scalar
//! `score` head, its pad id, the score statistics saved with it, its tokenizer checked against
//! the policy's, and scores of token ids read at each sequence's last real token.

use std::path::Path;

use data::Tokenizer;
use llama::{Head, Llama, LlamaConfig, Side, StepInput};
use trainer::{Result, TrainError};

use crate::eval::RewardStats;

/// The pad id of reward batches: the config's, else 0 (`<unk>` in Llama 2's vocabulary, never
/// produced by its byte-fallback tokenizer). Transformers finds the last real token by it, so
/// it must not be EOS, which ends every answer.
pub fn reward_pad_id(config: &LlamaConfig) -> u32 {
    config.pad_token_id.unwrap_or(0)
}

/// A frozen reward model.
pub struct RewardModel {
    pub config: LlamaConfig,
    pub model: Llama,
    pub pad: u32,
    /// Mean and std of its scores, saved with it by `train reward`: read by
    /// [`RewardModel::with_stats`] for the methods that normalise scores.
    pub stats: Option<RewardStats>,
    /// Its own tokenizer when it differs from the policy's and re-tokenizing was allowed: the
    /// policy's text is then decoded and encoded again for it.
    pub tokenizer: Option<Tokenizer>,
}

impl RewardModel {
    /// Loads a reward model directory on `device` (without autodiff: it never holds gradients).
    /// A model without a scalar head is refused.
    pub fn load(dir: &Path, device: &burn::prelude::Device) -> Result<Self> {
        let (config, model) = llama::load_pretrained(dir, device)?;
        if model.head() != Head::Score {
            return Err(TrainError::Invalid(format!(
                "{}: not a reward model (no scalar `score` head); train one with `train reward`",
                dir.display()
            )));
        }
        Ok(Self {
            pad: reward_pad_id(&config),
            stats: None,
            config,
            model,
            tokenizer: None,
        })
    }

    /// Reads the score statistics saved in `dir` beside the model (none when absent).
    pub fn with_stats(mut self, dir: &Path) -> Result<Self> {
        self.stats = RewardStats::load(dir)?;
        Ok(self)
    }

    /// A reward model already in memory (tests, benchmarks), with no statistics or tokenizer
    /// of its own.
    pub fn new(model: Llama, config: LlamaConfig) -> Self {
        Self {
            pad: reward_pad_id(&config),
            stats: None,
            config,
            model,
            tokenizer: None,
        }
    }

    /// [`RewardModel::load`] for scoring what a policy with `tokenizer` wrote. A reward model
    /// shipping another tokenizer is refused (`hint` says how to allow it), unless `retokenize`:
    /// the text is then re-tokenized for it.
    pub fn for_policy(
        dir: &Path,
        device: &burn::prelude::Device,
        tokenizer: &Tokenizer,
        retokenize: bool,
        hint: &str,
    ) -> Result<Self> {
        let mut rm = Self::load(dir, device)?;
        match own_tokenizer(dir, &rm.config, tokenizer)? {
            None => {}
            Some(theirs) if retokenize => rm.tokenizer = Some(theirs),
            Some(_) => {
                return Err(TrainError::Invalid(format!(
                    "{}: the reward model's tokenizer differs from the policy's{hint}",
                    dir.join("tokenizer.json").display()
                )))
            }
        }
        Ok(rm)
    }

    /// Scores of whole sequences of the policy's token ids, read at each one's last token, in
    /// batches (right-padded); re-tokenized first when this model has its own tokenizer. A NaN
    /// or infinite score is an error.
    pub fn score(
        &self,
        sequences: &[Vec<u32>],
        policy_tokenizer: &Tokenizer,
        batch_size: usize,
    ) -> Result<Vec<f64>> {
        match &self.tokenizer {
            None => score_sequences(&self.model, sequences, batch_size, self.pad),
            Some(theirs) => {
                let ids = sequences
                    .iter()
                    .map(|s| retokenize(s, policy_tokenizer, theirs))
                    .collect::<Result<Vec<_>>>()?;
                score_sequences(&self.model, &ids, batch_size, self.pad)
            }
        }
    }
}

/// The tokenizer a model directory ships (`tokenizer.json`) when it differs from `tokenizer`;
/// `None` when it ships none or the same vocabulary. Without its own tokenizer the model must
/// at least hold every id of `tokenizer`. Used for reward and value models.
pub fn own_tokenizer(
    dir: &Path,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
) -> Result<Option<Tokenizer>> {
    let own = dir.join("tokenizer.json");
    if own.exists() {
        let theirs = Tokenizer::from_file(&own)?;
        if !theirs.same_vocabulary(tokenizer) {
            return Ok(Some(theirs));
        }
    }
    trainer::session::check_vocab(tokenizer, config, dir)?;
    Ok(None)
}

/// A sequence's text in another tokenizer: BOS, the decoded text, and EOS when the sequence
/// ended with one.
fn retokenize(ids: &[u32], ours: &Tokenizer, theirs: &Tokenizer) -> Result<Vec<u32>> {
    let content: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&t| t != ours.bos_id && t != ours.eos_id)
        .collect();
    let mut out = theirs.encode_with_bos(&ours.decode(&content)?)?;
    if ids.last() == Some(&ours.eos_id) {
        out.push(theirs.eos_id);
    }
    Ok(out)
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
        let input = StepInput::padded(chunk, pad, Side::Right);
        scores.extend(
            llama::model::finite_to_host(model.last_token_scores(&input), "scores")?
                .into_iter()
                .map(f64::from),
        );
    }
    Ok(scores)
}
