//! Targeted context distillation (`train distill`, Llama 2 section 4.2.4): answer each prompt
//! with and without a safety pre-prompt; where the safety reward model scores the pre-prompted
//! answer higher (always, when not `targeted`), keep it as the answer to the prompt *without*
//! the pre-prompt, and fine-tune on those pairs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use trainer::{Recipe, Result, RunOptions};

use crate::answers::{default_answer_tokens, generate_answers, one, AnswerSettings};
use crate::generate_then_sft::{generate_then_sft, Selection, StageSummary};

/// `[distill]`: answers to each prompt of `data.train` with and without the safety
/// `preprompt`; the pre-prompted answer is kept where the safety reward model scores it higher
/// (or always, without `targeted`), then SFT on the prompts without the pre-prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    pub safety_reward_model: PathBuf,
    #[serde(default = "default_preprompt")]
    pub preprompt: String,
    #[serde(default = "yes")]
    pub targeted: bool,
    #[serde(default = "default_answer_tokens")]
    pub max_new_tokens: usize,
    /// 0 (default): greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    /// Also keep pre-prompted answers cut off at `max_new_tokens` (without EOS).
    #[serde(default)]
    pub keep_unfinished: bool,
}

fn default_preprompt() -> String {
    "You are a safe and responsible assistant.".into()
}
fn yes() -> bool {
    true
}

impl trainer::Section for DistillSection {
    const NAME: &'static str = "distill";

    fn resolve_paths(&mut self, resolve: &mut dyn FnMut(&mut PathBuf)) {
        resolve(&mut self.safety_reward_model);
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.max_new_tokens == 0 || self.preprompt.trim().is_empty() {
            return Err(
                "[distill] needs a non-empty `preprompt` and a positive `max_new_tokens`".into(),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0 && self.temperature >= 0.0) {
            return Err("[distill] `top_p` must be in (0, 1] and `temperature` >= 0".into());
        }
        Ok(())
    }
}

/// Runs targeted context distillation as the recipe's `[distill]` section says.
pub fn run(
    recipe: &Recipe,
    section: &DistillSection,
    options: &RunOptions,
) -> Result<StageSummary> {
    generate_then_sft(recipe, options, &section.safety_reward_model, |inputs| {
        let (prompts, tokenizer) = (&inputs.prompts, &inputs.tokenizer);
        let (config, model) = inputs.policy(recipe)?;
        let (s, seed) = (section, recipe.train.seed);
        let batch = recipe.micro_batch_size();
        let settings = AnswerSettings::new(s.max_new_tokens, s.temperature, s.top_p, seed, batch);
        let pre = Some(section.preprompt.as_str());
        let with = generate_answers(&model, &config, tokenizer, prompts, pre, &settings, 1)?;
        let without = generate_answers(&model, &config, tokenizer, prompts, None, &settings, 1)?;
        // Both answers are scored as answers to the prompt without the pre-prompt.
        let score_with = inputs.score(&with, settings.batch_size)?;
        let score_without = inputs.score(&without, settings.batch_size)?;
        let mut candidates = Vec::with_capacity(prompts.len());
        let mut kept = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let keep = !with[i].text.is_empty()
                && (with[i].ended || section.keep_unfinished)
                && (!section.targeted || score_with[i] > score_without[i]);
            candidates.push(serde_json::json!({
                "prompt": prompt.text(),
                "with_preprompt": with[i].text,
                "without_preprompt": without[i].text,
                "score_with": score_with[i],
                "score_without": score_without[i],
                "ended_with_eos": with[i].ended,
                "kept": keep,
            }));
            if keep {
                kept.push((prompt.clone(), with[i].text.clone()));
            }
        }
        Ok(Selection {
            prompts: prompts.len(),
            kept,
            candidates,
        })
    })
}
