//! What every trainer does around its loop: claim the output directory, load the starting
//! model, and write and find checkpoints.
//!
//! A checkpoint `<output.dir>/checkpoint-<step>/` is a Hugging Face model directory (so
//! `train generate`, `train export` and `train score` read it directly) plus `optimizer.bpk` and
//! `trainer_state.json`. It is assembled under a hidden name and renamed into place, so a crash
//! never leaves a half-written checkpoint and never damages the previous one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::prelude::Device;
use data::Tokenizer;
use llama::{Head, Llama, LlamaConfig, SaveOptions};

pub use crate::output::OutputLock;
use crate::Recipe;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] llama::LlamaError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The cause is in the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |error| TrainError::Io {
        path: path.to_path_buf(),
        error,
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
    /// Optimizer steps (PPO: iterations) done.
    pub step: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// Parameter ids by name: the optimizer state is keyed by them.
    pub param_ids: HashMap<String, u64>,
    /// Whatever else a trainer must restore (PPO: the KL controller, the value model's ids).
    #[serde(default)]
    pub extra: serde_json::Value,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// The checkpoint `resume` names: a directory, or the newest `checkpoint-N` of the run.
pub fn find_checkpoint(out: &Path, resume: &str) -> Result<PathBuf> {
    if resume != "latest" {
        let dir = PathBuf::from(resume);
        if !dir.join(STATE_FILE).exists() {
            return Err(TrainError::Invalid(format!(
                "{}: not a training checkpoint (no {STATE_FILE})",
                dir.display()
            )));
        }
        return Ok(dir);
    }
    let newest = checkpoint_steps(out)?.into_iter().max().ok_or_else(|| {
        TrainError::Invalid(format!("{}: no checkpoint to resume from", out.display()))
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

/// Locks the output directory, resolves `--resume`, and refuses a directory that holds another
/// run unless `--overwrite` (and then only a run of ours). Removes partial checkpoints of
/// killed saves; changes nothing else on disk: call [`start_output`] once the inputs have
/// loaded. Keep the lock for the whole run.
pub fn check_output(
    recipe: &Recipe,
    options: &RunOptions,
) -> Result<(OutputLock, Option<PathBuf>)> {
    let out = &recipe.output.dir;
    let lock = OutputLock::acquire(out)?;
    let resume = match &options.resume {
        Some(which) => Some(find_checkpoint(out, which)?),
        None => None,
    };
    if resume.is_none() {
        lock.check_replaceable(options.overwrite, "use --overwrite to replace it")?;
    }
    lock.remove_stale_partials()?;
    Ok((lock, resume))
}

/// Empties the output directory of a fresh run (a resumed one keeps it), marks it as a run of
/// ours, and writes the fully resolved recipe into it.
pub fn start_output(recipe: &Recipe, lock: &OutputLock, resuming: bool) -> Result<()> {
    if !resuming {
        lock.clear()?;
    }
    lock.mark()?;
    let recipe_path = lock.dir().join("recipe.toml");
    let text = recipe
        .to_toml()
        .map_err(|e| TrainError::Invalid(format!("writing recipe.toml: {e}")))?;
    std::fs::write(&recipe_path, text).map_err(io_err(&recipe_path))
}

pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}

/// Loads the model the recipe names, with the head the trainer needs: a checkpoint, or a fresh
/// model of an architecture.
pub fn load_model(recipe: &Recipe, device: &Device, head: Head) -> Result<(LlamaConfig, Llama)> {
    match (&recipe.model.checkpoint, &recipe.model.config) {
        (Some(dir), _) => Ok(llama::load_pretrained_as(
            dir,
            device,
            head,
            recipe.train.seed,
        )?),
        (None, Some(config)) => {
            let config = llama::load_config(config)?;
            let model = llama::init_random_with_head(&config, device, head, recipe.train.seed)?;
            Ok((config, model))
        }
        (None, None) => Err(TrainError::Invalid(
            "[model] needs `config` or `checkpoint`".into(),
        )),
    }
}

/// The model to train: from the checkpoint being resumed (with the parameter ids its optimizer
/// state refers to, and its trainer state), or as the recipe names it. A resumed run must use
/// the checkpoint's tokenizer.
pub fn load_or_resume(
    recipe: &Recipe,
    device: &Device,
    head: Head,
    resume: Option<&Path>,
    tokenizer: &Tokenizer,
) -> Result<(LlamaConfig, Llama, Option<TrainerState>)> {
    match resume {
        Some(dir) => {
            let state = read_state(dir)?;
            check_resumed_tokenizer(tokenizer, dir)?;
            let (config, model) =
                llama::load_pretrained_with_ids(dir, device, Some(&state.param_ids))?;
            if model.head() != head {
                return Err(TrainError::Invalid(format!(
                    "{}: the checkpoint has a {:?} head, this trainer needs a {head:?} head",
                    dir.display(),
                    model.head()
                )));
            }
            Ok((config, model, Some(state)))
        }
        None => {
            let (config, model) = load_model(recipe, device, head)?;
            Ok((config, model, None))
        }
    }
}

/// Refuses to resume a checkpoint with another tokenizer than the one it was trained with
/// (saved beside its weights), which would also be written into the new checkpoints.
fn check_resumed_tokenizer(tokenizer: &Tokenizer, checkpoint: &Path) -> Result<()> {
    let saved = [
        Some(checkpoint.join("tokenizer.json")),
        tokenizer.path.file_name().map(|name| checkpoint.join(name)),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file());
    let Some(saved) = saved else {
        return Ok(());
    };
    if !Tokenizer::from_file(&saved)?.same_vocabulary(tokenizer) {
        return Err(TrainError::Invalid(format!(
            "{}: the recipe's tokenizer differs from the one this checkpoint was trained with \
             ({}); resume with model.tokenizer = that file",
            tokenizer.path.display(),
            saved.display()
        )));
    }
    Ok(())
}

/// Refuses training sequences longer than the model's positions.
pub fn check_context(recipe: &Recipe, config: &LlamaConfig) -> Result<()> {
    if recipe.data.max_seq_len > config.max_position_embeddings {
        return Err(TrainError::Invalid(format!(
            "data.max_seq_len {} exceeds the model's context of {} tokens \
             (max_position_embeddings)",
            recipe.data.max_seq_len, config.max_position_embeddings
        )));
    }
    Ok(())
}

/// Refuses a tokenizer with more tokens than the model's vocabulary.
pub fn check_vocab(tokenizer: &Tokenizer, config: &LlamaConfig, path: &Path) -> Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(TrainError::Invalid(format!(
            "{}: tokenizer has {} tokens but the model's vocabulary is {}",
            path.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(())
}

/// [`check_vocab`] for a model that generates: an embedding padded past its tokenizer is
/// legitimate, and said once here; generation never picks the ids the tokenizer lacks.
pub fn check_generation_vocab(
    tokenizer: &Tokenizer,
    config: &LlamaConfig,
    path: &Path,
) -> Result<()> {
    check_vocab(tokenizer, config, path)?;
    if tokenizer.vocab_size() < config.vocab_size {
        eprintln!(
            "note: {} has {} tokens and the model's vocabulary {}; ids {} to {} are embedding \
             padding and are never generated",
            path.display(),
            tokenizer.vocab_size(),
            config.vocab_size,
            tokenizer.vocab_size(),
            config.vocab_size - 1
        );
    }
    Ok(())
}

/// Writes `<output.dir>/checkpoint-<step>`: `write` fills a hidden staging directory, which is
/// then renamed into place. Afterwards removes the oldest checkpoints beyond `keep_last`.
pub fn save_checkpoint(
    recipe: &Recipe,
    step: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let out = &recipe.output.dir;
    let dir = out.join(format!("checkpoint-{step}"));
    let staging = out.join(format!(".checkpoint-{step}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    write(&staging)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::rename(&staging, &dir).map_err(io_err(&dir))?;
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

/// Writes one model as a Hugging Face directory at `dir`, with the recipe's tokenizer beside it.
pub fn write_model(model: &Llama, config: &LlamaConfig, recipe: &Recipe, dir: &Path) -> Result<()> {
    let options = SaveOptions {
        extra_files: vec![recipe.model.tokenizer.clone()],
        overwrite: true,
        ..SaveOptions::default()
    };
    Ok(llama::save_pretrained(model, config, dir, &options)?)
}

/// Writes the optimizer state and `trainer_state.json` into a checkpoint being assembled.
pub fn write_training_state(
    dir: &Path,
    optimizer: &burn::optim::ModuleOptimizer,
    state: &TrainerState,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    optimizer
        .save(&optimizer_path)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", optimizer_path.display())))?;
    let state_path = dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("state serializes");
    std::fs::write(&state_path, text).map_err(io_err(&state_path))
}

/// Restores the optimizer state saved in a checkpoint.
pub fn load_optimizer(
    optimizer: burn::optim::ModuleOptimizer,
    checkpoint: &Path,
    file: &str,
) -> Result<burn::optim::ModuleOptimizer> {
    let path = checkpoint.join(file);
    optimizer
        .load(&path)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}

/// Steps of a run: `max_steps`, or `epochs` passes over `items` in batches of `batch_size`.
pub fn total_steps(recipe: &Recipe, items: usize) -> usize {
    let steps_per_epoch = items.div_ceil(recipe.train.batch_size);
    recipe
        .train
        .max_steps
        .unwrap_or(recipe.train.epochs * steps_per_epoch)
}

/// The recipe's `[data]`, tokenized; examples truncated, dropped or skipped are counted on
/// stderr.
pub fn load_recipe_data(recipe: &Recipe, tokenizer: &Tokenizer) -> Result<data::LoadedData> {
    let data = data::load_data(&recipe.data, Path::new(""), tokenizer, recipe.train.seed)?;
    let count = |f: fn(&data::SourceStats) -> usize| data.sources.iter().map(f).sum::<usize>();
    let (truncated, dropped) = (count(|s| s.truncated), count(|s| s.dropped));
    if truncated + dropped + data.errors() > 0 {
        eprintln!(
            "data: {} training and {} evaluation examples kept; {truncated} truncated and \
             {dropped} dropped at max_seq_len {}; {} malformed records skipped",
            data.train.len(),
            data.eval.len(),
            recipe.data.max_seq_len,
            data.errors()
        );
    }
    Ok(data)
}

/// Refuses training data smaller than one global batch; `what` names the items ("sequences").
pub fn check_one_batch(items: usize, recipe: &Recipe, what: &str) -> Result<()> {
    if items < recipe.train.batch_size {
        return Err(TrainError::Invalid(format!(
            "the training data has {items} {what}, fewer than one batch of {}",
            recipe.train.batch_size
        )));
    }
    Ok(())
}

/// The step a run starts at: 0, or the resumed checkpoint's step. `None` when that checkpoint
/// already finished the run (said on stderr): there is nothing to train, and nothing on disk
/// has changed.
pub fn start_step(
    state: Option<&TrainerState>,
    total_steps: usize,
    resume: Option<&Path>,
) -> Option<usize> {
    let start = state.map_or(0, |s| s.step);
    if let (Some(_), Some(dir)) = (state, resume) {
        if start >= total_steps {
            eprintln!(
                "{} is at step {start} of {total_steps}: the run is finished, nothing to do \
                 (raise train.max_steps or train.epochs to train further)",
                dir.display()
            );
            return None;
        }
    }
    Some(start)
}

/// AdamW as the recipe says, with the state saved in the checkpoint being resumed.
pub fn optimizer(recipe: &Recipe, resume: Option<&Path>) -> Result<ModuleOptimizer> {
    let optimizer = crate::optim::adamw(&recipe.train);
    match resume {
        Some(dir) => load_optimizer(optimizer, dir, OPTIMIZER_FILE),
        None => Ok(optimizer),
    }
}
