//! `train ppo`: the setup (policy, value model, frozen reference, reward models, prompts) and
//! the loop over iterations, with metrics, sample logs and checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use data::Tokenized;
use llama::Head;
use reward::RewardModel;
use trainer::metrics::reopen_jsonl;
use trainer::session::{check_generation_vocab, load_model};
use trainer::{io_err, MemoryPlan, Pass, Recipe, Result, Run, RunOptions, Session, TrainError};

use crate::iteration::{IterationReport, Models, Ppo, Prompt};
use crate::section::PpoSection;

/// Where the value model and its optimizer live inside a checkpoint.
pub const VALUE_DIR: &str = "value";
const SAMPLES_FILE: &str = "samples.jsonl";

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub iterations: usize,
    pub first_reward_mean: Option<f64>,
    pub final_reward_mean: f64,
    pub final_kl: f64,
    pub checkpoint: PathBuf,
}

/// The prompts of the recipe's data, with their categories.
fn prompts(session: &Session) -> Result<Vec<Prompt>> {
    let data = session.data()?;
    let dropped: usize = data.sources.iter().map(|s| s.dropped).sum();
    let prompts: Vec<Prompt> = data
        .train
        .into_iter()
        .filter_map(|item| match item.tokens {
            Tokenized::Prompt { ids, category } => Some(Prompt { ids, category }),
            _ => None,
        })
        .collect();
    if prompts.is_empty() {
        return Err(TrainError::Invalid(
            "the data holds no prompts (PPO samples from `prompts` records: {\"prompt\"} or \
             {\"messages\"} ending with a user turn)"
                .into(),
        ));
    }
    if dropped > 0 {
        eprintln!(
            "skipped {dropped} prompts longer than data.max_seq_len = {}",
            session.recipe.data.max_seq_len
        );
    }
    Ok(prompts)
}

/// Where the value model starts: `value_model`, else the helpfulness, else the safety reward
/// model (with LoRA, the base its adapters sit on).
fn value_source(s: &PpoSection) -> Result<PathBuf> {
    s.value_model
        .clone()
        .or_else(|| s.reward_model.clone())
        .or_else(|| s.safety_reward_model.clone())
        .ok_or_else(|| TrainError::Invalid("[ppo] needs a reward model".into()))
}

/// The value model: from the checkpoint being resumed, else `value_model`, else the
/// (helpfulness, else safety) reward model with its scalar head.
fn value_model(session: &Session, s: &PpoSection) -> Result<(llama::LlamaConfig, llama::Llama)> {
    let source = value_source(s)?;
    let (mut config, value) = match (&session.resume, &session.state) {
        (Some(dir), Some(state)) => {
            let ids: std::collections::HashMap<String, u64> =
                serde_json::from_value(state.extra["value_param_ids"].clone()).map_err(|e| {
                    TrainError::Invalid(format!(
                        "{}: value model parameter ids: {e}",
                        dir.join(trainer::checkpoint::STATE_FILE).display()
                    ))
                })?;
            trainer::session::resume_model(
                session.recipe,
                &dir.join(VALUE_DIR),
                &session.device,
                Head::Score,
                &ids,
            )?
        }
        _ => {
            let seed = session.recipe.train.seed;
            let (config, value) =
                llama::load_pretrained_as(&source, &session.device, Head::Score, seed)?;
            // Its own adapter draws, not the policy's.
            let value = trainer::session::adapt(session.recipe, value, seed.wrapping_add(1))?;
            (config, value)
        }
    };
    let value = trainer::session::with_precision(session.recipe, value);
    if value.head() != Head::Score {
        return Err(TrainError::Invalid(format!(
            "{}: the value model needs a scalar head",
            source.display()
        )));
    }
    if reward::model::own_tokenizer(&source, &config, &session.tokenizer)?.is_some() {
        return Err(TrainError::Invalid(format!(
            "{}: the value model's tokenizer differs from the policy's; give ppo.value_model \
             with the policy's tokenizer",
            source.join("tokenizer.json").display()
        )));
    }
    config.pad_token_id = Some(config.pad_token_id.unwrap_or(0));
    Ok((config, value))
}

/// The memory plan of PPO: the policy and the value model trained on mini-batches of prompt +
/// response positions (the policy through its language-model head), the frozen reference and
/// reward models (`reward_models`: their configs), and the KV cache of one iteration's
/// generation.
pub fn memory_plan(
    recipe: &Recipe,
    settings: &PpoSection,
    policy: &llama::LlamaConfig,
    value: Option<&llama::LlamaConfig>,
    reward_models: &[llama::LlamaConfig],
) -> MemoryPlan {
    let positions = recipe.data.max_seq_len + settings.max_new_tokens;
    let pass = |lm_head| Pass {
        rows: recipe.micro_batch_size(),
        positions,
        lm_head,
    };
    let rollouts = recipe.train.batch_size * settings.group_size.max(1);
    let generated = settings.generation_batch.unwrap_or(rollouts).min(rollouts);
    let kv_cache = (generated * positions * 2 * policy.kv_dim()) as u64
        * policy.num_hidden_layers as u64
        * recipe.runtime.precision().activation_bytes();
    let mut plan = MemoryPlan::for_recipe(policy, pass(true), recipe);
    if let Some(value) = value {
        plan = plan.and(MemoryPlan::for_recipe(value, pass(false), recipe));
    }
    // With LoRA the reference is the policy's own base, held once.
    if recipe.lora.is_none() {
        plan = plan.and(MemoryPlan::frozen_as(policy, recipe.runtime.precision()));
    }
    let mut plan = plan.and(MemoryPlan::buffers(kv_cache));
    for rm in reward_models {
        plan = plan.and(MemoryPlan::frozen_as(rm, recipe.runtime.precision()));
    }
    plan
}

/// Runs PPO as the recipe and its `[ppo]` section say.
pub fn run(recipe: &Recipe, settings: &PpoSection, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let mut session = Session::open(recipe, options)?;
    session.unit = "iteration";
    let prompts = prompts(&session)?;
    session.check_one_batch(prompts.len(), "prompts")?;

    let inner = session.inference_device();
    let load_rm = |path: &Option<PathBuf>| -> Result<Option<RewardModel>> {
        let hint = "; set ppo.retokenize = true to score decoded text re-tokenized for it";
        path.as_ref()
            .map(|p| {
                let rm = RewardModel::for_policy(
                    p,
                    &inner,
                    &session.tokenizer,
                    settings.retokenize,
                    hint,
                )?
                .with_stats(p)?;
                // Frozen, in the run's dtype like the policy.
                let rm = RewardModel {
                    model: trainer::session::with_precision(recipe, rm.model),
                    ..rm
                };
                if settings.normalize_reward && rm.stats.is_none() {
                    return Err(TrainError::Invalid(format!(
                        "{}: no {} to normalise with (ppo.normalize_reward = true)",
                        p.display(),
                        reward::eval::STATS_FILE
                    )));
                }
                Ok(rm)
            })
            .transpose()
    };
    let helpfulness = load_rm(&settings.reward_model)?;
    let safety = load_rm(&settings.safety_reward_model)?;

    let (config, policy) = session.model(Head::Lm)?;
    check_generation_vocab(&session.tokenizer, &config, &recipe.model.tokenizer)?;
    if recipe.data.max_seq_len + settings.max_new_tokens > config.context_length() {
        return Err(TrainError::Invalid(format!(
            "data.max_seq_len {} + ppo.max_new_tokens {} exceeds the model's context of {}",
            recipe.data.max_seq_len,
            settings.max_new_tokens,
            config.context_length()
        )));
    }
    // The reference is the initial policy: with LoRA, the policy's own frozen base with the
    // adapters left out (no second copy of the weights); otherwise loaded again (on resume too).
    let reference = match &recipe.lora {
        Some(_) => llama::lora::without_adapters(&burn::module::Module::valid(&policy)),
        None => trainer::session::with_precision(recipe, load_model(recipe, &inner, Head::Lm)?.1),
    };
    let (value_config, value) = match settings.has_value_model() {
        true => {
            let (config, value) = value_model(&session, settings)?;
            (Some(config), Some(value))
        }
        false => (None, None),
    };
    let rm_configs: Vec<_> = [&helpfulness, &safety]
        .into_iter()
        .flatten()
        .map(|rm| rm.config.clone())
        .collect();
    session.check_memory(&memory_plan(
        recipe,
        settings,
        &config,
        value_config.as_ref(),
        &rm_configs,
    ))?;
    let vocab_limit = session.tokenizer.vocab_size().min(config.vocab_size);
    let finished = Summary {
        iterations: trainer::session::total_steps(recipe, prompts.len()),
        first_reward_mean: None,
        final_reward_mean: f64::NAN,
        final_kl: f64::NAN,
        checkpoint: session.resume.clone().unwrap_or_default(),
    };
    if session.finished_before(prompts.len()) {
        return Ok(finished);
    }
    // The value model's optimizer and the KL controller of the run being resumed, read before
    // anything is written.
    let value_optimizer = match settings.has_value_model() {
        true => Some(session.optimizer(VALUE_DIR)?),
        false => None,
    };
    let kl = match (&session.resume, &session.state) {
        (Some(dir), Some(state)) => Some(
            serde_json::from_value(state.extra["kl"].clone()).map_err(|e| {
                TrainError::Invalid(format!("{}: KL controller state: {e}", dir.display()))
            })?,
        ),
        _ => None,
    };
    let Some((mut run, policy_optimizer)) = session.start(prompts.len())? else {
        return Ok(finished);
    };
    let models = Models {
        policy,
        value,
        reference,
        helpfulness,
        safety,
    };
    let mut ppo = Ppo::new(
        models,
        &config,
        train,
        recipe.micro_batch_size(),
        settings.clone(),
    );
    ppo.vocab_limit = vocab_limit;
    // No LoRA dropout in PPO's passes (as TRL): the old log-probabilities were taken without it,
    // and the probability ratio must start at 1.
    ppo.policy_optimizer = policy_optimizer;
    if let Some(value_optimizer) = value_optimizer {
        ppo.value_optimizer = value_optimizer;
    }
    if let Some(kl) = kl {
        ppo.kl = kl;
    }

    let out = &recipe.output.dir;
    let samples_path = out.join(SAMPLES_FILE);
    let mut samples_file =
        reopen_jsonl(&samples_path, "iteration", run.start).map_err(io_err(&samples_path))?;
    let lengths: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    let mut batches = run.batches(lengths);
    let mut first_reward = None;
    let mut last = IterationReport::default();
    let mut checkpoint = PathBuf::new();
    for iteration in run.start..run.total {
        let (_, indices) = batches.batch(iteration);
        let batch: Vec<Prompt> = indices.iter().map(|&i| prompts[i].clone()).collect();
        let report = ppo.iteration(&batch, iteration, &run.tokenizer)?;
        let done = iteration + 1;
        check_iteration(&report, done, settings, out)?;
        first_reward.get_or_insert(report.reward_mean);
        run.progress(done);
        if run.due(done, train.log_every.max(1)) {
            let mut values = report.values.clone();
            values.push(("lr", train.lr));
            run.log("train", done, &values)?;
        }
        if settings.sample_every > 0 && done.is_multiple_of(settings.sample_every) {
            write_samples(&mut run, &mut samples_file, &samples_path, &report, done)?;
        }
        if run.due(done, train.save_every) {
            checkpoint = save(&run, &ppo, settings, &config, value_config.as_ref(), done)?;
        }
        last = report;
    }
    let run_total = run.total;
    run.finish(&checkpoint);
    Ok(Summary {
        iterations: run_total,
        first_reward_mean: first_reward,
        final_reward_mean: last.reward_mean,
        final_kl: last.kl,
        checkpoint,
    })
}

/// Stops a run whose numbers diverged or whose policy ran away from the reference.
fn check_iteration(
    report: &IterationReport,
    done: usize,
    settings: &PpoSection,
    out: &Path,
) -> Result<()> {
    if let Some((key, value)) = report.values.iter().find(|(_, v)| !v.is_finite()) {
        return Err(TrainError::Invalid(format!(
            "iteration {done}: {key} is {value}: training diverged; the last checkpoint in \
             {} is kept",
            out.display()
        )));
    }
    if report.kl > settings.max_kl {
        return Err(TrainError::Invalid(format!(
            "iteration {done}: KL to the reference is {:.3} per sequence, above \
             ppo.max_kl = {}: the policy ran away; the last checkpoint in {} is kept",
            report.kl,
            settings.max_kl,
            out.display()
        )));
    }
    Ok(())
}

/// Appends an iteration's samples to `samples.jsonl` and shows them in TensorBoard.
fn write_samples(
    run: &mut Run,
    file: &mut std::fs::File,
    path: &Path,
    report: &IterationReport,
    done: usize,
) -> Result<()> {
    let mut markdown = String::new();
    for sample in &report.samples {
        writeln!(file, "{sample}").map_err(io_err(path))?;
        markdown.push_str(&format!(
            "**prompt** {}\n\n**response** {}\n\n**reward** {:.4}\n\n---\n\n",
            sample["prompt"].as_str().unwrap_or(""),
            sample["response"].as_str().unwrap_or(""),
            sample["reward"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    file.flush().map_err(io_err(path))?;
    run.text("samples", done, &markdown);
    Ok(())
}

/// `checkpoint-<iteration>/`: the policy (a Hugging Face directory with its optimizer and the
/// trainer state, which holds the KL controller), and (GAE) `value/`, the value model with its
/// optimizer.
fn save(
    run: &Run,
    ppo: &Ppo,
    settings: &PpoSection,
    config: &llama::LlamaConfig,
    value_config: Option<&llama::LlamaConfig>,
    step: usize,
) -> Result<PathBuf> {
    run.save(
        step,
        &ppo.policy,
        config,
        &ppo.policy_optimizer,
        |dir, state| {
            let (Some(value), Some(value_config)) = (&ppo.value, value_config) else {
                state.extra = serde_json::json!({ "kl": ppo.kl });
                return Ok(());
            };
            let value_dir = dir.join(VALUE_DIR);
            let base = value_source(settings)?;
            trainer::checkpoint::write_model(
                value,
                value_config,
                run.recipe,
                Some(&base),
                &value_dir,
            )?;
            trainer::checkpoint::write_optimizer(&value_dir, &ppo.value_optimizer)?;
            state.extra = serde_json::json!({
                "kl": ppo.kl,
                "value_param_ids": llama::weights::param_ids(value),
            });
            Ok(())
        },
    )
}
