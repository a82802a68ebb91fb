//! Answers to prompts: batched, KV-cached generation in the chat format (optionally with a
//! system pre-prompt), and scoring of prompt + answer with a reward model.

use std::path::Path;

use data::render::drop_after_bos;
use data::{render_dialog, Message, PromptRecord, Role, Tokenizer};
use llama::{Llama, LlamaConfig, SamplingParams};
use reward::RewardModel;
use trainer::{Result, TrainError};

#[derive(Debug, Clone)]
pub struct AnswerSettings {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Sequences per generation batch.
    pub batch_size: usize,
}

/// Default answer length of the sampling methods' sections (`max_new_tokens`).
pub fn default_answer_tokens() -> usize {
    128
}

/// Default `temperature` and `top_p` of the sampling methods' sections.
pub fn one() -> f64 {
    1.0
}

impl AnswerSettings {
    /// A method's sampling settings, with the recipe's seed and `batch_size` sequences per
    /// generation batch.
    pub fn new(
        max_new_tokens: usize,
        temperature: f64,
        top_p: f64,
        seed: u64,
        batch: usize,
    ) -> Self {
        Self {
            max_new_tokens,
            temperature,
            top_p,
            seed,
            batch_size: batch,
        }
    }
}

/// A generated answer to `prompts[prompt]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub prompt: usize,
    /// New tokens, ending with EOS when `ended`.
    pub ids: Vec<u32>,
    pub text: String,
    pub ended: bool,
}

/// The prompt's token ids in the chat format, with `system` as a system turn when given; the
/// oldest tokens after BOS are dropped when prompt and answer would not fit `max_positions`.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    prompt: &PromptRecord,
    system: Option<&str>,
    room: usize,
) -> Result<Vec<u32>> {
    let mut messages = Vec::with_capacity(prompt.messages.len() + 1);
    if let Some(system) = system {
        if prompt.messages.first().map(|m| m.role) != Some(Role::System) {
            messages.push(Message::new(Role::System, system));
        }
    }
    messages.extend(prompt.messages.iter().cloned());
    let mut ids = render_dialog(tokenizer, &messages)?.ids;
    let excess = ids.len().saturating_sub(room);
    drop_after_bos(&mut ids, excess);
    Ok(ids)
}

/// `copies` answers to every prompt, in prompt order (copy by copy for each prompt).
pub fn generate_answers(
    model: &Llama,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    prompts: &[PromptRecord],
    system: Option<&str>,
    settings: &AnswerSettings,
    copies: usize,
) -> Result<Vec<Answer>> {
    let room = config
        .context_length()
        .saturating_sub(settings.max_new_tokens);
    if room < 8 {
        return Err(TrainError::Invalid(format!(
            "max_new_tokens {} leaves no room for prompts in a context of {}",
            settings.max_new_tokens,
            config.context_length()
        )));
    }
    let mut rows: Vec<(usize, Vec<u32>)> = Vec::with_capacity(prompts.len() * copies);
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = prompt_ids(tokenizer, prompt, system, room)?;
        for _ in 0..copies.max(1) {
            rows.push((i, ids.clone()));
        }
    }
    let mut answers = Vec::with_capacity(rows.len());
    for (chunk_index, chunk) in rows.chunks(settings.batch_size.max(1)).enumerate() {
        let params = SamplingParams {
            max_new_tokens: settings.max_new_tokens,
            temperature: settings.temperature as f32,
            top_p: settings.top_p as f32,
            seed: settings.seed.wrapping_add(chunk_index as u64),
            eos_token_id: Some(tokenizer.eos_id),
            pad_token_id: config.pad_token_id.unwrap_or(0),
            use_cache: true,
            max_positions: config.context_length(),
            vocab_limit: Some(tokenizer.vocab_size()),
        };
        let batch: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
        for ((prompt, _), generated) in chunk.iter().zip(llama::generate(model, &batch, &params)?) {
            let content: Vec<u32> = generated
                .tokens
                .iter()
                .copied()
                .filter(|&t| t != tokenizer.eos_id)
                .collect();
            answers.push(Answer {
                prompt: *prompt,
                text: tokenizer.decode(&content)?.trim().to_string(),
                ids: generated.tokens,
                ended: generated.stopped_at_eos,
            });
        }
    }
    Ok(answers)
}

/// Reward-model scores of each answer to its prompt (rendered without any system pre-prompt).
pub fn score_answers(
    rm: &RewardModel,
    tokenizer: &Tokenizer,
    prompts: &[PromptRecord],
    answers: &[Answer],
    batch_size: usize,
) -> Result<Vec<f64>> {
    let room = rm.config.context_length();
    let sequences: Vec<Vec<u32>> = answers
        .iter()
        .map(|a| {
            let mut ids = prompt_ids(
                tokenizer,
                &prompts[a.prompt],
                None,
                room.saturating_sub(a.ids.len()).max(2),
            )?;
            ids.extend_from_slice(&a.ids);
            ids.truncate(room);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    rm.score(&sequences, tokenizer, batch_size)
}

/// Writes `{"prompt": [messages], "response": text}` records (the `prompt-response` format) that
/// `train sft` trains on.
pub fn write_sft_records(path: &Path, records: &[(&PromptRecord, &str)]) -> Result<()> {
    let text: String = records
        .iter()
        .map(|(prompt, response)| {
            serde_json::json!({"prompt": prompt.messages, "response": response}).to_string() + "\n"
        })
        .collect();
    std::fs::write(path, text).map_err(trainer::io_err(path))
}
