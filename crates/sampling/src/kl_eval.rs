//! `train eval kl`: how far a fine-tuned model has moved from a reference (the SFT model) on a
//! set of prompts, as the KL divergence of its answers: answers are sampled from the model, and
//! `Σ_t log π(y_t) - log π_ref(y_t)` over each answer's tokens is an unbiased estimate of
//! `KL(π ‖ π_ref)` over answers (of at most `max_new_tokens` tokens). Both distributions are
//! `softmax(logits / temperature)` over the ids the tokenizer can produce, the distribution the
//! answers were sampled from.

use data::{PromptRecord, Tokenizer};
use llama::model::to_host;
use llama::{Llama, LlamaConfig, Side, StepInput};
use serde::Serialize;
use trainer::{Result, TrainError};

use crate::answers::{generate_answers, prompt_ids, AnswerSettings};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KlReport {
    pub answers: usize,
    /// Answer tokens (EOS included).
    pub tokens: usize,
    /// Mean over answers of the summed per-token log-ratio: the KL per answer.
    pub kl_mean: f64,
    /// Standard deviation of the per-answer values (the estimate's standard error is this over
    /// the square root of `answers`).
    pub kl_std: f64,
    /// Summed log-ratio over all answers divided by their tokens.
    pub kl_per_token: f64,
    pub temperature: f64,
    /// Each answer's summed log-ratio, in prompt order.
    pub per_answer: Vec<f64>,
}

/// Each row's summed log-probability of the tokens after `starts[row]` under `model`,
/// `softmax(logits / temperature)` over the first `vocab_limit` ids.
fn answer_logps(
    model: &Llama,
    rows: &[Vec<u32>],
    starts: &[usize],
    pad: u32,
    temperature: f64,
    vocab_limit: usize,
) -> Vec<f64> {
    let input = StepInput::padded(rows, pad, Side::Right);
    let width = input.tokens[0].len();
    // Position t predicts token t + 1; the last position predicts nothing (target 0, unused).
    let targets: Vec<i64> = input
        .tokens
        .iter()
        .flat_map(|row| (0..width).map(move |t| row.get(t + 1).map_or(0, |&id| i64::from(id))))
        .collect();
    let hidden = model.hidden_states(&input, None);
    let picked = model.target_log_probs(hidden, targets, temperature, vocab_limit);
    let flat = to_host(picked);
    rows.iter()
        .zip(starts)
        .enumerate()
        .map(|(r, (row, &start))| {
            (start.saturating_sub(1)..row.len() - 1)
                .map(|t| f64::from(flat[r * width + t]))
                .sum()
        })
        .collect()
}

/// The KL of `model`'s answers to `prompts` (`copies` each, sampled as `settings` say) from
/// `reference`, which must share the model's tokenizer.
pub fn kl_to_reference(
    model: &Llama,
    reference: &Llama,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    prompts: &[PromptRecord],
    settings: &AnswerSettings,
    copies: usize,
) -> Result<KlReport> {
    if settings.temperature <= 0.0 || settings.top_p < 1.0 {
        return Err(TrainError::Invalid(
            "the KL is estimated from sampled answers: use a temperature > 0 and top-p 1".into(),
        ));
    }
    let answers = generate_answers(model, config, tokenizer, prompts, None, settings, copies)?;
    let room = config
        .context_length()
        .saturating_sub(settings.max_new_tokens);
    let vocab_limit = tokenizer.vocab_size().min(config.vocab_size);
    let pad = config.pad_token_id.unwrap_or(0);
    let mut per_answer = Vec::with_capacity(answers.len());
    let mut tokens = 0;
    for chunk in answers.chunks(settings.batch_size.max(1)) {
        let mut rows = Vec::with_capacity(chunk.len());
        let mut starts = Vec::with_capacity(chunk.len());
        for answer in chunk {
            let mut ids = prompt_ids(tokenizer, &prompts[answer.prompt], None, room)?;
            starts.push(ids.len());
            ids.extend_from_slice(&answer.ids);
            tokens += answer.ids.len();
            rows.push(ids);
        }
        let t = settings.temperature;
        let policy = answer_logps(model, &rows, &starts, pad, t, vocab_limit);
        let frozen = answer_logps(reference, &rows, &starts, pad, t, vocab_limit);
        per_answer.extend(policy.iter().zip(&frozen).map(|(p, r)| p - r));
    }
    let stats = reward::RewardStats::of(&per_answer);
    Ok(KlReport {
        answers: per_answer.len(),
        tokens,
        kl_mean: stats.mean,
        kl_std: stats.std,
        kl_per_token: per_answer.iter().sum::<f64>() / tokens.max(1) as f64,
        temperature: settings.temperature,
        per_answer,
    })
}
