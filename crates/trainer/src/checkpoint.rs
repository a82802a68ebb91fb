//! Checkpoints: `<output.dir>/checkpoint-<step>/` is a Hugging Face model directory (so
//! `train generate`, `train export` and `train score` read it directly) plus `optimizer.bpk`
//! and `trainer_state.json`. It is assembled under a hidden name and renamed into place, so a
//! crash never leaves a half-written checkpoint and never damages the previous one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use llama::{Llama, LlamaConfig, SaveOptions};

use crate::error::{io_err, Result, TrainError};
use crate::Recipe;

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
    /// How a LoRA run quantised its frozen base (`None`: not a LoRA run, or a checkpoint
    /// from before this was recorded). Resuming with another setting would train the same
    /// adapters on different base weights, so it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_base: Option<llama::lora::BaseQuant>,
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

/// Steps of the complete checkpoints in `out` (those with a trainer state), unordered.
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

pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
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

/// Writes one trained model at `dir` with the recipe's tokenizer beside it: a Hugging Face
/// directory, or, for a model with LoRA adapters, a PEFT adapter directory whose
/// `base_model_name_or_path` is `base` (the frozen model the adapters sit on).
pub fn write_model(
    model: &Llama,
    config: &LlamaConfig,
    recipe: &Recipe,
    base: Option<&Path>,
    dir: &Path,
) -> Result<()> {
    let (Some(lora), Some(base)) = (&recipe.lora, base) else {
        // A bf16 run's weights are bf16: saved as such, exactly, and half the size.
        let dtype = match recipe.runtime.precision() {
            crate::recipe::Precision::Bf16 => llama::SaveDtype::BF16,
            _ => llama::SaveDtype::F32,
        };
        let options = SaveOptions {
            dtype,
            extra_files: vec![recipe.model.tokenizer.clone()],
            overwrite: true,
            ..SaveOptions::default()
        };
        return Ok(llama::save_pretrained(model, config, dir, &options)?);
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Absolute, so the adapter still finds its base wherever the run directory is read from.
    let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
    let spec = lora.spec();
    let info = llama::lora::AdapterInfo {
        spec: &spec,
        dropout: lora.dropout,
        base: &base,
    };
    llama::lora::write_adapter(model, &info, dir)?;
    let tokenizer = &recipe.model.tokenizer;
    if let Some(name) = tokenizer.file_name() {
        let dest = dir.join(name);
        std::fs::copy(tokenizer, &dest).map_err(io_err(tokenizer))?;
    }
    Ok(())
}

/// Writes an optimizer's state as `dir/optimizer.bpk`.
pub fn write_optimizer(dir: &Path, optimizer: &ModuleOptimizer) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(OPTIMIZER_FILE);
    optimizer
        .save(&path)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes the optimizer state and `trainer_state.json` into a checkpoint being assembled.
pub fn write_training_state(
    dir: &Path,
    optimizer: &ModuleOptimizer,
    state: &TrainerState,
) -> Result<()> {
    write_optimizer(dir, optimizer)?;
    let state_path = dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("state serializes");
    std::fs::write(&state_path, text).map_err(io_err(&state_path))
}

/// AdamW as the recipe says, with the state saved in `dir` (a checkpoint being resumed, or a
/// model directory inside one) when given.
pub fn optimizer(recipe: &Recipe, dir: Option<&Path>) -> Result<ModuleOptimizer> {
    let optimizer = crate::optim::adamw(&recipe.train);
    let Some(dir) = dir else {
        return Ok(optimizer);
    };
    let path = dir.join(OPTIMIZER_FILE);
    optimizer
        .load(&path)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}
