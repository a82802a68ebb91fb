//! The SFT training loop: one readable loop over optimizer steps, each made of micro-batches
//! whose gradients accumulate to the global batch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use data::batch::{batch_order, Dataset, SequenceBatch, SequenceDataset, SequenceItem};
use data::{load_data, Tokenized, Tokenizer};
use llama::{Llama, LlamaConfig, SaveOptions};
use trainer::optim::{adamw, clip_grad_norm};
use trainer::schedule::{learning_rate, warmup_steps};
use trainer::Recipe;

use crate::loss::sft_loss;

#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error(transparent)]
    Model(#[from] llama::LlamaError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, SftError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SftError + '_ {
    move |source| SftError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an output directory that holds another run.
    pub overwrite: bool,
    /// Continue from a checkpoint directory, or `latest` in the output directory.
    pub resume: Option<String>,
}

/// Training state saved in every checkpoint next to the weights and `optimizer.bpk`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// Parameter ids by name: the optimizer state is keyed by them.
    pub param_ids: HashMap<String, u64>,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// The checkpoint `resume` names: a directory, or the newest `checkpoint-N` of the run.
pub fn find_checkpoint(out: &Path, resume: &str) -> Result<PathBuf> {
    if resume != "latest" {
        let dir = PathBuf::from(resume);
        if !dir.join(STATE_FILE).exists() {
            return Err(SftError::Invalid(format!(
                "{}: not a training checkpoint (no {STATE_FILE})",
                dir.display()
            )));
        }
        return Ok(dir);
    }
    let newest = checkpoint_steps(out)?.into_iter().max().ok_or_else(|| {
        SftError::Invalid(format!("{}: no checkpoint to resume from", out.display()))
    })?;
    Ok(out.join(format!("checkpoint-{newest}")))
}

fn checkpoint_steps(out: &Path) -> Result<Vec<usize>> {
    if !out.exists() {
        return Ok(Vec::new());
    }
    Ok(std::fs::read_dir(out)
        .map_err(io_err(out))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(STATE_FILE).exists())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("checkpoint-"))
                .and_then(|n| n.parse().ok())
        })
        .collect())
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub checkpoint: PathBuf,
}

/// Loads the model the recipe names: a checkpoint, or a fresh model of an architecture.
pub fn load_model(recipe: &Recipe, device: &Device) -> Result<(LlamaConfig, Llama)> {
    match (&recipe.model.checkpoint, &recipe.model.config) {
        (Some(dir), _) => Ok(llama::load_pretrained(dir, device)?),
        (None, Some(config)) => {
            let config = llama::load_config(config)?;
            let model = llama::init_random(&config, device, recipe.train.seed)?;
            Ok((config, model))
        }
        (None, None) => Err(SftError::Invalid(
            "[model] needs `config` or `checkpoint`".into(),
        )),
    }
}

fn sequences(items: Vec<data::Item>, recipe: &Recipe) -> SequenceDataset {
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    SequenceDataset::new(&examples, recipe.data.max_seq_len, recipe.data.packing)
}

fn get_all(dataset: &SequenceDataset, indices: &[usize]) -> Vec<SequenceItem> {
    indices
        .iter()
        .filter_map(|&i| dataset.get(i).ok())
        .collect()
}

/// Mean token loss over a dataset, without gradients.
fn evaluate(model: &Llama, dataset: &SequenceDataset, batch_size: usize, pad: u32) -> f64 {
    let all: Vec<usize> = (0..dataset.len()).collect();
    let batches: Vec<SequenceBatch> = all
        .chunks(batch_size.max(1))
        .map(|chunk| SequenceBatch::new(&get_all(dataset, chunk), pad))
        .collect();
    let total: usize = batches.iter().map(SequenceBatch::trained_tokens).sum();
    batches
        .iter()
        .map(|b| sft_loss(model, b, total).into_scalar::<f32>() as f64)
        .sum()
}

fn metrics_file(out: &Path) -> PathBuf {
    out.join("metrics.jsonl")
}

fn total_steps_of(recipe: &Recipe, train_set: &SequenceDataset) -> usize {
    let steps_per_epoch = train_set.len().div_ceil(recipe.train.batch_size);
    recipe
        .train
        .max_steps
        .unwrap_or(recipe.train.epochs * steps_per_epoch)
}

/// Runs supervised fine-tuning as the recipe says.
pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let device = llama::parse_device(&recipe.runtime.device)?.autodiff();
    let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
    let out = &recipe.output.dir;
    let resume = match &options.resume {
        Some(which) => Some(find_checkpoint(out, which)?),
        None => None,
    };
    if resume.is_none()
        && out.exists()
        && std::fs::read_dir(out)
            .map_err(io_err(out))?
            .next()
            .is_some()
        && !options.overwrite
    {
        return Err(SftError::Invalid(format!(
            "{}: output directory holds another run (use --overwrite to replace it)",
            out.display()
        )));
    }

    let data = load_data(&recipe.data, Path::new(""), &tokenizer, train.seed)?;
    if data.errors() > 0 {
        eprintln!(
            "skipped {} malformed records (on_error = \"skip\")",
            data.errors()
        );
    }
    let train_set = sequences(data.train, recipe);
    let eval_set = sequences(data.eval, recipe);
    if train_set.len() < train.batch_size {
        return Err(SftError::Invalid(format!(
            "the training data has {} sequences, fewer than one batch of {}",
            train_set.len(),
            train.batch_size
        )));
    }
    let (config, mut model, state) = match &resume {
        Some(dir) => {
            let path = dir.join(STATE_FILE);
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let state: TrainerState = serde_json::from_str(&text)
                .map_err(|e| SftError::Invalid(format!("{}: {e}", path.display())))?;
            let (config, model) =
                llama::load_pretrained_with_ids(dir, &device, Some(&state.param_ids))?;
            (config, model, Some(state))
        }
        None => {
            let (config, model) = load_model(recipe, &device)?;
            (config, model, None)
        }
    };
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(SftError::Invalid(format!(
            "{}: tokenizer has {} tokens but the model's vocabulary is {}",
            recipe.model.tokenizer.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }

    if resume.is_none() && out.exists() {
        std::fs::remove_dir_all(out).map_err(io_err(out))?;
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let recipe_path = out.join("recipe.toml");
    std::fs::write(&recipe_path, recipe.to_toml()).map_err(io_err(&recipe_path))?;
    let start_step = state.as_ref().map_or(0, |s| s.step);
    if start_step >= total_steps_of(recipe, &train_set) && resume.is_some() {
        return Err(SftError::Invalid(format!(
            "the checkpoint is at step {start_step}; nothing left to train (raise train.max_steps)"
        )));
    }
    let mut metrics =
        trainer::metrics::MetricsLogger::open(out, start_step, total_steps_of(recipe, &train_set))
            .map_err(io_err(out))?;

    let lengths = train_set.lengths();
    let steps_per_epoch = lengths.len().div_ceil(train.batch_size);
    let total_steps = total_steps_of(recipe, &train_set);
    let warmup = warmup_steps(train.warmup_steps, train.warmup_ratio, total_steps);
    let micro = recipe.micro_batch_size();
    let pad = config.pad_token_id.unwrap_or(0);
    let mut optimizer = adamw(train);
    if let Some(dir) = &resume {
        let path = dir.join(OPTIMIZER_FILE);
        optimizer = optimizer
            .load(&path)
            .map_err(|e| SftError::Invalid(format!("{}: {e}", path.display())))?;
        eprintln!("resuming from {} at step {start_step}", dir.display());
    }
    let mut order: Vec<Vec<usize>> = Vec::new();
    let mut order_epoch = usize::MAX;
    let mut last_loss = f64::NAN;
    let mut eval_loss = None;
    let started = Instant::now();
    let mut window_tokens = 0usize;
    let mut window_start = Instant::now();

    for step in start_step..total_steps {
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = batch_order(
                &lengths,
                train.batch_size,
                train.seed,
                epoch as u64,
                recipe.data.bucket_by_length,
            );
            order_epoch = epoch;
        }
        let items = get_all(&train_set, &order[step % steps_per_epoch]);
        let micro_batches: Vec<SequenceBatch> = items
            .chunks(micro)
            .map(|chunk| SequenceBatch::new(chunk, pad))
            .collect();
        let trained: usize = micro_batches
            .iter()
            .map(SequenceBatch::trained_tokens)
            .sum();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        // Summed on the device and read once per step, not once per micro-batch.
        let mut step_loss: Option<Tensor<1>> = None;
        for batch in &micro_batches {
            let loss = sft_loss(&model, batch, trained);
            let detached = loss.clone().detach();
            step_loss = Some(match step_loss.take() {
                Some(sum) => sum + detached,
                None => detached,
            });
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            window_tokens += batch.tokens.iter().map(Vec::len).sum::<usize>();
        }
        let loss_value = step_loss.map_or(0.0, |l| l.into_scalar::<f32>() as f64);
        let mut grads = accumulator.grads();
        let grad_norm = clip_grad_norm(&model, &mut grads, train.grad_clip);
        if !loss_value.is_finite() || !grad_norm.is_finite() {
            return Err(SftError::Invalid(format!(
                "step {}: loss {loss_value}, gradient norm {grad_norm}: training diverged; \
                 the last checkpoint in {} is kept",
                step + 1,
                out.display()
            )));
        }
        let lr = learning_rate(
            train.schedule,
            train.lr,
            train.min_lr_ratio,
            warmup,
            step,
            total_steps,
        );
        model = optimizer.step(lr, model, grads);
        last_loss = loss_value;

        let done = step + 1;
        metrics.progress(done);
        if done % train.log_every.max(1) == 0 || done == total_steps {
            let seconds = window_start.elapsed().as_secs_f64().max(1e-9);
            metrics
                .log(
                    "train",
                    done,
                    &[
                        ("loss", loss_value),
                        ("lr", lr),
                        ("grad_norm", grad_norm),
                        ("tokens_per_sec", window_tokens as f64 / seconds),
                        ("trained_tokens", trained as f64),
                        ("epoch", epoch as f64),
                    ],
                )
                .map_err(io_err(metrics_file(out).as_path()))?;
            window_tokens = 0;
            window_start = Instant::now();
        }
        let eval_now = !eval_set.is_empty()
            && ((train.eval_every > 0 && done % train.eval_every == 0) || done == total_steps);
        if eval_now {
            let loss = evaluate(&model.valid(), &eval_set, micro, pad);
            metrics
                .log(
                    "eval",
                    done,
                    &[("eval_loss", loss), ("eval_perplexity", loss.exp())],
                )
                .map_err(io_err(metrics_file(out).as_path()))?;
            eval_loss = Some(loss);
        }
        if train.save_every > 0 && done % train.save_every == 0 && done != total_steps {
            save(&model, &optimizer, &config, recipe, done, total_steps)?;
        }
    }
    let checkpoint = save(
        &model,
        &optimizer,
        &config,
        recipe,
        total_steps,
        total_steps,
    )?;
    metrics.finish();
    eprintln!(
        "finished {total_steps} steps in {:.1} s; checkpoint {}",
        started.elapsed().as_secs_f64(),
        checkpoint.display()
    );
    Ok(Summary {
        steps: total_steps,
        final_loss: last_loss,
        eval_loss,
        checkpoint,
    })
}

/// Writes `<output.dir>/checkpoint-<step>`: the model in Hugging Face format plus the optimizer
/// state and `trainer_state.json`, assembled in a temporary directory and renamed into place, so
/// a crash never leaves a half-written checkpoint. Then removes the oldest checkpoints beyond
/// `keep_last`.
fn save(
    model: &Llama,
    optimizer: &burn::optim::ModuleOptimizer,
    config: &LlamaConfig,
    recipe: &Recipe,
    step: usize,
    total_steps: usize,
) -> Result<PathBuf> {
    let out = &recipe.output.dir;
    let dir = out.join(format!("checkpoint-{step}"));
    let staging = out.join(format!(".staging-{step}"));
    std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    let optimizer_path = staging.join(OPTIMIZER_FILE);
    optimizer
        .save(&optimizer_path)
        .map_err(|e| SftError::Invalid(format!("{}: {e}", optimizer_path.display())))?;
    let state = TrainerState {
        step,
        total_steps,
        seed: recipe.train.seed,
        param_ids: llama::model::param_ids(model),
    };
    let state_path = staging.join(STATE_FILE);
    let text = serde_json::to_string_pretty(&state).expect("state serializes");
    std::fs::write(&state_path, text).map_err(io_err(&state_path))?;
    let options = SaveOptions {
        extra_files: vec![recipe.model.tokenizer.clone(), optimizer_path, state_path],
        overwrite: true,
        ..SaveOptions::default()
    };
    llama::save_pretrained(model, config, &dir, &options)?;
    std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    if let Some(keep) = recipe.train.keep_last {
        let mut steps = checkpoint_steps(out)?;
        steps.sort_unstable();
        for old in steps.iter().take(steps.len().saturating_sub(keep.max(1))) {
            let path = out.join(format!("checkpoint-{old}"));
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(dir)
}

/// Tokens/s of full training steps (forward, loss, backward, clipping, AdamW) on random full-length
/// sequences of the recipe's batch shape, after one warm-up step. A benchmark, not a test.
pub fn bench(recipe: &Recipe, steps: usize) -> Result<f64> {
    use rand::{Rng, SeedableRng};
    let train = &recipe.train;
    let device = llama::parse_device(&recipe.runtime.device)?.autodiff();
    let (config, mut model) = load_model(recipe, &device)?;
    let mut optimizer = adamw(train);
    let mut rng = rand::rngs::StdRng::seed_from_u64(train.seed);
    let len = recipe.data.max_seq_len;
    let items: Vec<SequenceItem> = (0..train.batch_size)
        .map(|_| {
            let ids: Vec<u32> = (0..len)
                .map(|_| rng.random_range(3..config.vocab_size as u32))
                .collect();
            SequenceItem {
                trained: vec![true; len],
                positions: (0..len).collect(),
                segments: vec![0; len],
                ids,
            }
        })
        .collect();
    let micro_batches: Vec<SequenceBatch> = items
        .chunks(recipe.micro_batch_size())
        .map(|c| SequenceBatch::new(c, 0))
        .collect();
    let trained: usize = micro_batches
        .iter()
        .map(SequenceBatch::trained_tokens)
        .sum();
    let mut timed = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        for batch in &micro_batches {
            let loss = sft_loss(&model, batch, trained);
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let mut grads = accumulator.grads();
        clip_grad_norm(&model, &mut grads, train.grad_clip);
        model = optimizer.step(train.lr, model, grads);
        // Reading a parameter back waits for the step to finish on asynchronous backends.
        let _ = llama::model::to_host(model.norm.gamma.val());
        if step > 0 {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok((steps * train.batch_size * len) as f64 / timed.max(1e-9))
}
