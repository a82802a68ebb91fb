//! Targeted context distillation (`train distill`, Llama 2 section 4.2.4): answer each prompt
//! with and without a safety pre-prompt; where the safety reward model scores the pre-prompted
//! answer higher (always, when not `targeted`), keep it as the answer to the prompt *without*
//! the pre-prompt, and fine-tune on those pairs.

use data::Tokenizer;
use llama::Head;
use trainer::run::{io_err, Result, RunOptions, TrainError};
use trainer::Recipe;

use crate::answers::{generate_answers, load_reward_model, score_answers, AnswerSettings};
use crate::rs::{generate_then_sft, recipe_prompts, StageSummary};

pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<StageSummary> {
    let section = recipe
        .distill
        .clone()
        .ok_or_else(|| TrainError::Invalid("the recipe has no [distill] section".into()))?;
    let prompts = recipe_prompts(recipe)?;
    let device = llama::parse_device(&recipe.runtime.device)?;
    let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
    let (rm_config, rm) = load_reward_model(&section.safety_reward_model, &device, &tokenizer)?;
    generate_then_sft(recipe, options, |dir| {
        let (config, model) = trainer::run::load_model(recipe, &device, Head::Lm)?;
        trainer::run::check_vocab(&tokenizer, &config, &recipe.model.tokenizer)?;
        let settings = AnswerSettings {
            max_new_tokens: section.max_new_tokens,
            temperature: section.temperature,
            top_p: section.top_p,
            seed: recipe.train.seed,
            batch_size: recipe.micro_batch_size(),
        };
        let pre = Some(section.preprompt.as_str());
        let with = generate_answers(&model, &config, &tokenizer, &prompts, pre, &settings, 1)?;
        let without = generate_answers(&model, &config, &tokenizer, &prompts, None, &settings, 1)?;
        // Both answers are scored as answers to the prompt without the pre-prompt.
        let b = settings.batch_size;
        let score_with = score_answers(&rm, &rm_config, &tokenizer, &prompts, &with, b)?;
        let score_without = score_answers(&rm, &rm_config, &tokenizer, &prompts, &without, b)?;
        let mut records = String::new();
        let mut kept = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let keep =
                !with[i].text.is_empty() && (!section.targeted || score_with[i] > score_without[i]);
            records.push_str(
                &(serde_json::json!({
                    "prompt": prompt.text(),
                    "with_preprompt": with[i].text,
                    "without_preprompt": without[i].text,
                    "score_with": score_with[i],
                    "score_without": score_without[i],
                    "kept": keep,
                })
                .to_string()
                    + "\n"),
            );
            if keep {
                kept.push((prompt.clone(), with[i].text.clone()));
            }
        }
        let path = dir.join("candidates.jsonl");
        std::fs::write(&path, records).map_err(io_err(&path))?;
        eprintln!(
            "kept {} of {} pre-prompted answers",
            kept.len(),
            prompts.len()
        );
        Ok(kept)
    })
}
