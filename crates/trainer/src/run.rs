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

use crate::Recipe;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
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

pub type Result<T> = std::result::Result<T, TrainError>;

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
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

/// Resolves `--resume` and refuses an output directory that holds another run unless
/// `--overwrite`. Changes nothing on disk: call [`start_output`] once the inputs have loaded.
pub fn check_output(recipe: &Recipe, options: &RunOptions) -> Result<Option<PathBuf>> {
    let out = &recipe.output.dir;
    let resume = match &options.resume {
        Some(which) => Some(find_checkpoint(out, which)?),
        None => None,
    };
    let occupied = out.exists()
        && std::fs::read_dir(out)
            .map_err(io_err(out))?
            .next()
            .is_some();
    if resume.is_none() && occupied && !options.overwrite {
        return Err(TrainError::Invalid(format!(
            "{}: output directory holds another run (use --overwrite to replace it)",
            out.display()
        )));
    }
    Ok(resume)
}

/// Empties the output directory of a fresh run (a resumed one keeps it) and writes the fully
/// resolved recipe into it.
pub fn start_output(recipe: &Recipe, resuming: bool) -> Result<()> {
    let out = &recipe.output.dir;
    if !resuming && out.exists() {
        std::fs::remove_dir_all(out).map_err(io_err(out))?;
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let recipe_path = out.join("recipe.toml");
    std::fs::write(&recipe_path, recipe.to_toml()).map_err(io_err(&recipe_path))
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
/// state refers to, and its trainer state), or as the recipe names it.
pub fn load_or_resume(
    recipe: &Recipe,
    device: &Device,
    head: Head,
    resume: Option<&Path>,
) -> Result<(LlamaConfig, Llama, Option<TrainerState>)> {
    match resume {
        Some(dir) => {
            let state = read_state(dir)?;
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

/// The recipe's `[data]`, tokenized; malformed records skipped under `on_error = "skip"` are
/// counted on stderr.
pub fn load_recipe_data(recipe: &Recipe, tokenizer: &Tokenizer) -> Result<data::LoadedData> {
    let data = data::load_data(&recipe.data, Path::new(""), tokenizer, recipe.train.seed)?;
    if data.errors() > 0 {
        eprintln!(
            "skipped {} malformed records (on_error = \"skip\")",
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

/// The step a run starts at: 0, or the resumed checkpoint's step, which must leave work to do.
pub fn start_step(state: Option<&TrainerState>, total_steps: usize) -> Result<usize> {
    let start = state.map_or(0, |s| s.step);
    if state.is_some() && start >= total_steps {
        return Err(TrainError::Invalid(format!(
            "the checkpoint is at step {start}; nothing left to train (raise train.max_steps)"
        )));
    }
    Ok(start)
}

/// AdamW as the recipe says, with the state saved in the checkpoint being resumed.
pub fn optimizer(recipe: &Recipe, resume: Option<&Path>) -> Result<ModuleOptimizer> {
    let optimizer = crate::optim::adamw(&recipe.train);
    match resume {
        Some(dir) => load_optimizer(optimizer, dir, OPTIMIZER_FILE),
        None => Ok(optimizer),
    }
}
