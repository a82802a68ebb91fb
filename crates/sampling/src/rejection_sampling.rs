//! Rejection sampling fine-tuning (`train rs`), as in Llama 2's first RLHF rounds: sample K
//! answers to each prompt, keep the one the reward model scores best (optionally only above a
//! threshold), and fine-tune on the kept answers with the SFT trainer.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use trainer::{Recipe, Result, RunOptions};

use crate::answers::{default_answer_tokens, generate_answers, one, AnswerSettings};
use crate::generate_then_sft::{generate_then_sft, Selection, StageSummary};

/// `[rs]`: `samples_per_prompt` answers to each prompt of `data.train`, the best by the reward
/// model kept (if at least `threshold`), then SFT on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsSection {
    pub reward_model: PathBuf,
    #[serde(default = "default_samples_per_prompt")]
    pub samples_per_prompt: usize,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default = "default_answer_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    /// Also keep answers cut off at `max_new_tokens` (without EOS); SFT would then teach the
    /// model to stop mid-answer, so they are skipped by default.
    #[serde(default)]
    pub keep_unfinished: bool,
}

fn default_samples_per_prompt() -> usize {
    4
}

impl trainer::Section for RsSection {
    const NAME: &'static str = "rs";

    fn resolve_paths(&mut self, resolve: &mut dyn FnMut(&mut PathBuf)) {
        resolve(&mut self.reward_model);
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.samples_per_prompt == 0 || self.max_new_tokens == 0 {
            return Err("[rs] `samples_per_prompt` and `max_new_tokens` must be positive".into());
        }
        // Best-of-K needs K different answers: greedy decoding would give K copies.
        if !(self.top_p > 0.0 && self.top_p <= 1.0 && self.temperature > 0.0) {
            return Err(
                "[rs] `top_p` must be in (0, 1] and `temperature` > 0 (it samples K answers)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Runs rejection sampling fine-tuning as the recipe's `[rs]` section says.
pub fn run(recipe: &Recipe, section: &RsSection, options: &RunOptions) -> Result<StageSummary> {
    generate_then_sft(recipe, options, &section.reward_model, |inputs| {
        let prompts = &inputs.prompts;
        let (config, model) = inputs.policy(recipe)?;
        let (s, seed) = (section, recipe.train.seed);
        // All K answers to a prompt in one batch.
        let batch = recipe.micro_batch_size().max(s.samples_per_prompt);
        let settings = AnswerSettings::new(s.max_new_tokens, s.temperature, s.top_p, seed, batch);
        let k = section.samples_per_prompt;
        eprintln!("sampling {k} answers to each of {} prompts", prompts.len());
        let answers = generate_answers(
            &model,
            &config,
            &inputs.tokenizer,
            prompts,
            None,
            &settings,
            k,
        )?;
        let scores = inputs.score(&answers, settings.batch_size)?;
        let mut candidates = Vec::with_capacity(answers.len());
        let mut kept = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let group: Vec<usize> = (p * k..(p + 1) * k).collect();
            let best = group
                .iter()
                .copied()
                .filter(|&i| !answers[i].text.is_empty())
                .filter(|&i| answers[i].ended || section.keep_unfinished)
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            let keep = best.filter(|&i| section.threshold.is_none_or(|t| scores[i] >= t));
            for &i in &group {
                candidates.push(serde_json::json!({
                    "prompt": prompt.text(),
                    "answer": answers[i].text,
                    "score": scores[i],
                    "ended_with_eos": answers[i].ended,
                    "kept": Some(i) == keep,
                }));
            }
            if let Some(i) = keep {
                kept.push((prompt.clone(), answers[i].text.clone()));
            }
        }
        Ok(Selection {
            prompts: prompts.len(),
            kept,
            candidates,
        })
    })
}
