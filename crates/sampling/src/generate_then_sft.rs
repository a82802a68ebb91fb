//! The stage rejection sampling and context distillation share: generate answers to prompts,
//! keep some (the method decides which), then fine-tune on the kept ones with the SFT trainer.
//! The generation runs once; a resumed run goes straight on with SFT.

use std::path::{Path, PathBuf};

use data::{load_prompts, PromptRecord, Tokenizer};
use llama::Head;
use reward::RewardModel;
use trainer::{io_err, Recipe, Result, RunOptions, TrainError};

use crate::answers::{score_answers, write_sft_records, Answer};

/// What a generate-then-fine-tune run reports.
#[derive(Debug, Clone)]
pub struct StageSummary {
    pub prompts: usize,
    pub kept: usize,
    /// Where the candidates and the kept answers are recorded.
    pub records: PathBuf,
    pub sft: sft::train::Summary,
}

pub const GENERATED_DIR: &str = "generated";
const DONE_FILE: &str = "done.json";

/// What a method's generation stage chose.
pub struct Selection {
    pub prompts: usize,
    /// Prompts with the (non-empty) answer to fine-tune on.
    pub kept: Vec<(PromptRecord, String)>,
    /// Every candidate with its scores and whether it was kept, for `candidates.jsonl`.
    pub candidates: Vec<serde_json::Value>,
}

/// The shared shape of `train rs` and `train distill`: claim the output directory, load the
/// [`Inputs`] judged by `reward_model` and run `generate` on them once (skipped when a resumed
/// run finished it), record its candidates, write its kept answers as SFT data, then run SFT on
/// them into `<output.dir>/sft` (resuming it when it has checkpoints). The reward model is
/// loaded only for generation and freed before SFT.
pub fn generate_then_sft(
    recipe: &Recipe,
    options: &RunOptions,
    reward_model: &Path,
    generate: impl FnOnce(&Inputs) -> Result<Selection>,
) -> Result<StageSummary> {
    let out = &recipe.output.dir;
    if options.resume.as_deref().is_some_and(|r| r != "latest") {
        return Err(TrainError::Invalid(
            "this command resumes its own output directory: use --resume latest".into(),
        ));
    }
    // Held until the SFT stage (which locks its own `sft/` directory) has finished.
    let lock = trainer::output::OutputLock::acquire(out)?;
    let fresh = options.resume.is_none();
    if fresh {
        lock.check_replaceable(
            options.overwrite,
            "use --overwrite to replace it, or --resume latest to continue it",
        )?;
    }
    let generated = out.join(GENERATED_DIR);
    let done = generated.join(DONE_FILE);
    let sft_data = generated.join("sft-data.jsonl");
    // Loaded before anything on disk changes: a bad input leaves the directory as it was.
    let inputs = if !fresh && done.exists() {
        None
    } else {
        Some(Inputs::load(recipe, reward_model)?)
    };
    lock.begin(recipe, fresh)?;
    let (prompts, kept) = match inputs {
        None => {
            let info: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&done).map_err(io_err(&done))?)
                    .map_err(|e| TrainError::Invalid(format!("{}: {e}", done.display())))?;
            eprintln!(
                "generation already done ({}); going on with SFT",
                done.display()
            );
            (
                info["prompts"].as_u64().unwrap_or(0) as usize,
                info["kept"].as_u64().unwrap_or(0) as usize,
            )
        }
        Some(inputs) => {
            std::fs::create_dir_all(&generated).map_err(io_err(&generated))?;
            let selection = generate(&inputs)?;
            drop(inputs);
            let kept = record_selection(recipe, &selection, &generated, &sft_data)?;
            std::fs::write(
                &done,
                serde_json::json!({"prompts": selection.prompts, "kept": kept}).to_string(),
            )
            .map_err(io_err(&done))?;
            (selection.prompts, kept)
        }
    };

    let mut sft_recipe = recipe.clone();
    sft_recipe.section = None;
    sft_recipe.data.train = Some(sft_data);
    sft_recipe.data.sources.clear();
    sft_recipe.data.format = Some("prompt-response".into());
    sft_recipe.output.dir = out.join("sft");
    let has_checkpoint =
        trainer::checkpoint::find_checkpoint(&sft_recipe.output.dir, "latest").is_ok();
    let sft_options = RunOptions {
        overwrite: !has_checkpoint,
        resume: has_checkpoint.then(|| "latest".to_string()),
    };
    let sft = sft::train::run(&sft_recipe, &sft_options)?;
    Ok(StageSummary {
        prompts,
        kept,
        records: generated,
        sft,
    })
}

/// Records every candidate (`candidates.jsonl`) and writes the kept answers as SFT data;
/// refuses a selection that cannot make one SFT batch, before the stage is marked done, so a
/// rerun with other settings generates again.
fn record_selection(
    recipe: &Recipe,
    selection: &Selection,
    generated: &Path,
    sft_data: &Path,
) -> Result<usize> {
    let path = generated.join("candidates.jsonl");
    let lines: String = selection
        .candidates
        .iter()
        .map(|c| c.to_string() + "\n")
        .collect();
    std::fs::write(&path, lines).map_err(io_err(&path))?;
    let kept = selection.kept.len();
    eprintln!("kept answers for {kept} of {} prompts", selection.prompts);
    if kept == 0 {
        return Err(TrainError::Invalid(
            "no answer was kept: nothing to fine-tune on".into(),
        ));
    }
    // Without packing each answer is one sequence; packing only makes fewer.
    if kept < recipe.train.batch_size {
        return Err(TrainError::Invalid(format!(
            "{kept} answers were kept, fewer than one SFT batch of {} (train.batch_size): \
             lower it, or keep more answers",
            recipe.train.batch_size
        )));
    }
    let records: Vec<(&PromptRecord, &str)> = selection
        .kept
        .iter()
        .map(|(p, a)| (p, a.as_str()))
        .collect();
    write_sft_records(sft_data, &records)?;
    Ok(kept)
}

/// What both methods start from: the prompts of `data.train`, the tokenizer, and the frozen
/// reward model that judges the answers.
pub struct Inputs {
    pub prompts: Vec<PromptRecord>,
    pub device: burn::prelude::Device,
    pub tokenizer: Tokenizer,
    pub reward_model: RewardModel,
}

impl Inputs {
    pub fn load(recipe: &Recipe, reward_model: &Path) -> Result<Self> {
        let path = recipe.data.train.as_deref().ok_or_else(|| {
            TrainError::Invalid("[data] `train` must name the prompt file to sample from".into())
        })?;
        let prompts = load_prompts(path)?;
        let device = llama::parse_device(&recipe.runtime.device)?;
        let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
        let reward_model = RewardModel::for_policy(reward_model, &device, &tokenizer, false, "")?;
        Ok(Self {
            prompts,
            device,
            tokenizer,
            reward_model,
        })
    }

    /// The model to sample from, as `[model]` names it.
    pub fn policy(&self, recipe: &Recipe) -> Result<(llama::LlamaConfig, llama::Llama)> {
        let (config, model) = trainer::session::load_model(recipe, &self.device, Head::Lm)?;
        trainer::session::check_generation_vocab(
            &self.tokenizer,
            &config,
            &recipe.model.tokenizer,
        )?;
        Ok((config, model))
    }

    /// Reward-model scores of answers to these prompts.
    pub fn score(&self, answers: &[Answer], batch: usize) -> Result<Vec<f64>> {
        score_answers(
            &self.reward_model,
            &self.tokenizer,
            &self.prompts,
            answers,
            batch,
        )
    }
}
