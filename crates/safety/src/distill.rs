//! Targeted context distillation (`train distill`, Llama 2 section 4.2.4): answer each prompt
//! with and without a safety pre-prompt; where the safety reward model scores the pre-prompted
//! answer higher (always, when not `targeted`), keep it as the answer to the prompt *without*
//! the pre-prompt, and fine-tune on those pairs.

use trainer::run::{Result, RunOptions, TrainError};
use trainer::Recipe;

use crate::answers::{generate_answers, AnswerSettings};
use crate::rs::{generate_then_sft, Selection, StageSummary};

pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<StageSummary> {
    let section = recipe
        .distill
        .clone()
        .ok_or_else(|| TrainError::Invalid("the recipe has no [distill] section".into()))?;
    generate_then_sft(recipe, options, &section.safety_reward_model, |inputs| {
        let (prompts, tokenizer) = (&inputs.prompts, &inputs.tokenizer);
        let (config, model) = inputs.policy(recipe)?;
        let settings = AnswerSettings {
            max_new_tokens: section.max_new_tokens,
            temperature: section.temperature,
            top_p: section.top_p,
            seed: recipe.train.seed,
            batch_size: recipe.micro_batch_size(),
        };
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
