//! Recipes: TOML files with `[model]`, `[data]`, `[train]`, `[runtime]` and `[output]`.
//!
//! Unknown keys and wrong types are errors naming the key and the file; a file that does not
//! parse gives its line and column. `--set section.key=value` overrides any value before the
//! recipe is checked. Relative paths are resolved against the recipe's directory, and the fully
//! resolved recipe can be written next to a run's outputs.

use std::path::{Path, PathBuf};

use data::DataConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// The cause is in the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("--set {0}")]
    Override(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An architecture file (`configs/*.toml`) for a randomly initialised model...
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// ...or a checkpoint directory (Hugging Face format, or one of ours).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    pub tokenizer: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default)]
    pub seed: u64,
    /// Passes over the training data; ignored when `max_steps` is set.
    #[serde(default = "one")]
    pub epochs: usize,
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Sequences per optimizer step (the global batch).
    pub batch_size: usize,
    /// Sequences per forward/backward pass; gradients accumulate up to `batch_size`.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    pub lr: f64,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// The schedule's floor as a fraction of `lr` (the paper's reward models: 0.1).
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Gradient clipping by the global norm; none when absent or 0.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    #[serde(default = "one")]
    pub log_every: usize,
    /// 0: only at the end.
    #[serde(default)]
    pub eval_every: usize,
    /// 0: only at the end.
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints to keep (oldest removed first); all when absent.
    #[serde(default)]
    pub keep_last: Option<usize>,
}

fn one() -> usize {
    1
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_device() -> String {
    "flex".into()
}
fn default_dtype() -> String {
    "f32".into()
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            device: default_device(),
            dtype: default_dtype(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
}

/// How a reward model turns a pair's rating into the margin of its loss (Llama 2, Table 27).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarginKind {
    /// No margin, even for pairs with a numeric `margin`.
    None,
    /// 1, 2/3, 1/3, 0 from "significantly better" down to "negligibly better / unsure".
    #[default]
    Small,
    /// 3, 2, 1, 0.
    Large,
    /// `margin_table` in the recipe.
    Custom,
}

/// `[reward]`: the reward-model loss. Pairs without a rating use their numeric `margin`, or 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    #[serde(default)]
    pub margin: MarginKind,
    /// For `margin = "custom"`: the margin of each rating, keyed `significantly_better`,
    /// `better`, `slightly_better`, `negligibly_better`.
    #[serde(default)]
    pub margin_table: Option<std::collections::BTreeMap<String, f64>>,
    /// Reward centering: adds `centering * mean((r_chosen + r_rejected)^2)` to the loss, which
    /// keeps scores near zero without changing their differences. 0 turns it off.
    #[serde(default)]
    pub centering: f64,
}

/// Names of the rating levels as `margin_table` keys, strongest first.
pub const MARGIN_KEYS: [&str; 4] = [
    "significantly_better",
    "better",
    "slightly_better",
    "negligibly_better",
];

impl RewardSection {
    /// The margin of each rating level, strongest first.
    pub fn margins(&self) -> [f64; 4] {
        match self.margin {
            MarginKind::None => [0.0; 4],
            MarginKind::Small => [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0],
            MarginKind::Large => [3.0, 2.0, 1.0, 0.0],
            MarginKind::Custom => {
                let table = self.margin_table.clone().unwrap_or_default();
                MARGIN_KEYS.map(|k| table.get(k).copied().unwrap_or(0.0))
            }
        }
    }
}

/// `[ppo]`: RLHF with PPO (Llama 2, section 3.2.3). `[train]` holds the optimizer settings,
/// `batch_size` = prompts per iteration, `micro_batch_size` = prompts per PPO mini-batch (one
/// gradient step each), `max_steps` = iterations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// The helpfulness reward model (or the only one).
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    /// The safety reward model; with both, the Llama 2 rule picks one score per prompt.
    #[serde(default)]
    pub safety_reward_model: Option<PathBuf>,
    /// Use the safety score when sigmoid(safety score) is below this, or the prompt's category
    /// is `safety`.
    #[serde(default = "default_safety_threshold")]
    pub safety_threshold: f64,
    /// Initial value model; by default the (helpfulness, else safety) reward model.
    #[serde(default)]
    pub value_model: Option<PathBuf>,
    /// Learning rate of the value model (default: `train.lr`).
    #[serde(default)]
    pub value_lr: Option<f64>,
    /// Normalise each reward model's score with the mean and std saved with it.
    #[serde(default)]
    pub normalize_reward: bool,
    /// Whiten the combined reward over the batch, as the paper does.
    #[serde(default = "yes")]
    pub whiten_reward: bool,
    /// Clip the (whitened) reward to `[-reward_clip, reward_clip]`.
    #[serde(default)]
    pub reward_clip: Option<f64>,
    /// Subtracted from the reward of responses that hit `max_new_tokens` without EOS.
    #[serde(default)]
    pub no_eos_penalty: f64,
    /// Re-tokenize text for reward models whose tokenizer differs from the policy's.
    #[serde(default)]
    pub retokenize: bool,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one_f64")]
    pub temperature: f64,
    #[serde(default = "one_f64")]
    pub top_p: f64,
    /// β of the per-token KL penalty (the initial β when adaptive).
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// Adapt β toward this KL per sequence (Ziegler et al.); fixed β when absent.
    #[serde(default)]
    pub target_kl: Option<f64>,
    #[serde(default = "default_kl_horizon")]
    pub kl_horizon: usize,
    /// Stop the run when the mean KL per sequence exceeds this.
    #[serde(default = "default_max_kl")]
    pub max_kl: f64,
    #[serde(default = "one_f64")]
    pub gamma: f64,
    #[serde(default = "default_lambda")]
    pub lam: f64,
    #[serde(default = "default_clip")]
    pub clip_range: f64,
    #[serde(default = "default_clip")]
    pub value_clip_range: f64,
    #[serde(default = "default_value_coef")]
    pub value_coef: f64,
    /// Passes over each rollout batch.
    #[serde(default = "one")]
    pub ppo_epochs: usize,
    /// Write sampled prompt/response pairs every this many iterations (0: never).
    #[serde(default = "one")]
    pub sample_every: usize,
    #[serde(default = "default_samples")]
    pub samples: usize,
}

/// `[rs]`: rejection sampling fine-tuning (`train rs`): `samples_per_prompt` answers to each prompt
/// of `data.train`, the best by the reward model kept (if at least `threshold`), then SFT on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectionSection {
    pub reward_model: PathBuf,
    #[serde(default = "default_samples_per_prompt")]
    pub samples_per_prompt: usize,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default = "default_answer_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one_f64")]
    pub temperature: f64,
    #[serde(default = "one_f64")]
    pub top_p: f64,
    /// Also keep answers cut off at `max_new_tokens` (without EOS); SFT would then teach the
    /// model to stop mid-answer, so they are skipped by default.
    #[serde(default)]
    pub keep_unfinished: bool,
}

/// `[distill]`: targeted context distillation (`train distill`): answers to each prompt of
/// `data.train` with and without the safety `preprompt`; the pre-prompted answer is kept where
/// the safety reward model scores it higher (or always, without `targeted`), then SFT on the
/// prompts without the pre-prompt.
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
    #[serde(default = "one_f64")]
    pub top_p: f64,
    /// Also keep pre-prompted answers cut off at `max_new_tokens` (without EOS).
    #[serde(default)]
    pub keep_unfinished: bool,
}

fn default_samples_per_prompt() -> usize {
    4
}
fn default_answer_tokens() -> usize {
    128
}
fn default_preprompt() -> String {
    "You are a safe and responsible assistant.".into()
}

fn yes() -> bool {
    true
}
fn one_f64() -> f64 {
    1.0
}
fn default_safety_threshold() -> f64 {
    0.15
}
fn default_new_tokens() -> usize {
    64
}
fn default_kl_coef() -> f64 {
    0.01
}
fn default_kl_horizon() -> usize {
    10_000
}
fn default_max_kl() -> f64 {
    100.0
}
fn default_lambda() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_value_coef() -> f64 {
    0.1
}
fn default_samples() -> usize {
    4
}

/// A whole recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
    pub output: OutputSection,
    /// Only read by `train reward`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardSection>,
    /// Only read by `train ppo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppo: Option<PpoSection>,
    /// Only read by `train rs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rs: Option<RejectionSection>,
    /// Only read by `train distill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSection>,
}

fn invalid(path: &Path, message: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Applies `section.key=value` to a parsed recipe. The value is read as TOML (numbers, booleans,
/// strings in quotes, arrays), or taken as a plain string when it does not parse as TOML.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), RecipeError> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        RecipeError::Override(format!("`{assignment}`: expected section.key=value"))
    })?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(RecipeError::Override(format!(
            "`{assignment}`: the key must be section.key, e.g. train.lr"
        )));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = table;
    for part in &path[..path.len() - 1] {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| {
                RecipeError::Override(format!("`{assignment}`: `{part}` is not a section"))
            })?;
    }
    node.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

impl Recipe {
    /// Reads a recipe, applies overrides, checks it, and resolves its paths. A problem caused
    /// by a `--set` value is reported against that `--set`, not the file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|error| RecipeError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let file_table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| invalid(path, one_line(&e.to_string())))?;
        let mut table = file_table.clone();
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        let mut recipe = match Self::from_table(table) {
            Ok(recipe) => recipe,
            Err(message) => {
                return Err(match blame_deserialize(&file_table, overrides, &message) {
                    Some(assignment) => RecipeError::Override(format!("{assignment}: {message}")),
                    None => invalid(path, message),
                })
            }
        };
        let base = path.parent().unwrap_or(Path::new(""));
        recipe.resolve_paths(base);
        recipe.validate(path).map_err(|error| match error {
            RecipeError::Invalid { message, .. } => {
                match overrides.iter().find(|a| override_named_in(a, &message)) {
                    Some(assignment) => {
                        RecipeError::Override(format!("{}: {message}", assignment.trim()))
                    }
                    None => invalid(path, message),
                }
            }
            other => other,
        })?;
        // The resolved recipe is saved with every run: its paths must be writable as TOML.
        recipe.to_toml().map_err(|_| {
            invalid(
                path,
                "a path in this recipe (or the recipe's own path) is not valid UTF-8, which \
                 the run's recipe.toml cannot record",
            )
        })?;
        Ok(recipe)
    }

    fn from_table(table: toml::Table) -> Result<Self, String> {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| one_line(&e.to_string()))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = &mut self.model.config {
            fix(p);
        }
        if let Some(p) = &mut self.model.checkpoint {
            fix(p);
        }
        fix(&mut self.model.tokenizer);
        if let Some(p) = &mut self.data.train {
            fix(p);
        }
        if let Some(p) = &mut self.data.eval {
            fix(p);
        }
        for source in &mut self.data.sources {
            fix(&mut source.path);
        }
        fix(&mut self.output.dir);
        if let Some(rs) = &mut self.rs {
            fix(&mut rs.reward_model);
        }
        if let Some(distill) = &mut self.distill {
            fix(&mut distill.safety_reward_model);
        }
        if let Some(ppo) = &mut self.ppo {
            for p in [
                &mut ppo.reward_model,
                &mut ppo.safety_reward_model,
                &mut ppo.value_model,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), RecipeError> {
        match (&self.model.config, &self.model.checkpoint) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    path,
                    "[model]: give `config` or `checkpoint`, not both",
                ))
            }
            (None, None) => return Err(invalid(path, "[model]: needs `config` or `checkpoint`")),
            _ => {}
        }
        // The `[data]` section's own checks (formats, eval split, lengths), before any file is
        // read.
        self.data
            .resolved_sources(Path::new(""))
            .map_err(|e| invalid(path, format!("[data] {e}")))?;
        let t = &self.train;
        if t.batch_size == 0 {
            return Err(invalid(path, "[train] `batch_size` must be positive"));
        }
        let micro = self.micro_batch_size();
        if micro == 0 || !t.batch_size.is_multiple_of(micro) {
            return Err(invalid(
                path,
                format!(
                    "[train] `batch_size` {} is not divisible by `micro_batch_size` {micro}",
                    t.batch_size
                ),
            ));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(invalid(path, "[train] `lr` must be a positive number"));
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return Err(invalid(
                path,
                "[train] give `warmup_steps` or `warmup_ratio`, not both",
            ));
        }
        if let Some(r) = t.warmup_ratio {
            if !(0.0..1.0).contains(&r) {
                return Err(invalid(
                    path,
                    "[train] `warmup_ratio` must be within [0, 1)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(invalid(
                path,
                "[train] `min_lr_ratio` must be within [0, 1]",
            ));
        }
        if t.epochs == 0 && t.max_steps.is_none() {
            return Err(invalid(path, "[train] needs `epochs` >= 1 or `max_steps`"));
        }
        if t.grad_clip.is_some_and(|c| !(c >= 0.0 && c.is_finite())) {
            return Err(invalid(
                path,
                "[train] `grad_clip` must be >= 0 (0 or absent: no clipping)",
            ));
        }
        if !t.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return Err(invalid(path, "[train] `betas` must both be within [0, 1)"));
        }
        if !(t.eps > 0.0 && t.eps.is_finite()) {
            return Err(invalid(path, "[train] `eps` must be a positive number"));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return Err(invalid(path, "[train] `weight_decay` must be >= 0"));
        }
        if let Some(reward) = &self.reward {
            match (&reward.margin, &reward.margin_table) {
                (MarginKind::Custom, None) => {
                    return Err(invalid(
                        path,
                        "[reward] `margin = \"custom\"` needs a `margin_table`",
                    ))
                }
                (MarginKind::Custom, Some(table)) => {
                    for (key, value) in table {
                        if !MARGIN_KEYS.contains(&key.as_str()) {
                            return Err(invalid(
                                path,
                                format!(
                                    "[reward] margin_table: unknown rating `{key}` (expected {})",
                                    MARGIN_KEYS.join(", ")
                                ),
                            ));
                        }
                        if !value.is_finite() {
                            return Err(invalid(
                                path,
                                format!("[reward] margin_table.{key} must be a number"),
                            ));
                        }
                    }
                }
                (_, Some(_)) => {
                    return Err(invalid(
                        path,
                        "[reward] `margin_table` is only read with `margin = \"custom\"`",
                    ))
                }
                _ => {}
            }
            if !(reward.centering >= 0.0 && reward.centering.is_finite()) {
                return Err(invalid(path, "[reward] `centering` must be >= 0"));
            }
        }
        if let Some(ppo) = &self.ppo {
            if ppo.reward_model.is_none() && ppo.safety_reward_model.is_none() {
                return Err(invalid(
                    path,
                    "[ppo] needs `reward_model` or `safety_reward_model`",
                ));
            }
            let unit = |v: f64| (0.0..=1.0).contains(&v);
            if !(unit(ppo.gamma) && unit(ppo.lam) && unit(ppo.safety_threshold)) {
                return Err(invalid(
                    path,
                    "[ppo] `gamma`, `lam` and `safety_threshold` must be within [0, 1]",
                ));
            }
            if !(ppo.clip_range > 0.0 && ppo.value_clip_range > 0.0 && ppo.kl_coef >= 0.0) {
                return Err(invalid(
                    path,
                    "[ppo] `clip_range` and `value_clip_range` must be positive, `kl_coef` >= 0",
                ));
            }
            if ppo.max_new_tokens == 0 || ppo.ppo_epochs == 0 {
                return Err(invalid(
                    path,
                    "[ppo] `max_new_tokens` and `ppo_epochs` must be positive",
                ));
            }
            if !(ppo.top_p > 0.0 && ppo.top_p <= 1.0 && ppo.temperature > 0.0) {
                return Err(invalid(
                    path,
                    "[ppo] `top_p` must be in (0, 1] and `temperature` > 0 (PPO samples)",
                ));
            }
            if ppo.target_kl.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
                return Err(invalid(path, "[ppo] `target_kl` must be positive"));
            }
        }
        if let Some(rs) = &self.rs {
            if rs.samples_per_prompt == 0 || rs.max_new_tokens == 0 {
                return Err(invalid(
                    path,
                    "[rs] `samples_per_prompt` and `max_new_tokens` must be positive",
                ));
            }
            // Best-of-K needs K different answers: greedy decoding would give K copies.
            if !(rs.top_p > 0.0 && rs.top_p <= 1.0 && rs.temperature > 0.0) {
                return Err(invalid(
                    path,
                    "[rs] `top_p` must be in (0, 1] and `temperature` > 0 (it samples K answers)",
                ));
            }
        }
        if let Some(d) = &self.distill {
            if d.max_new_tokens == 0 || d.preprompt.trim().is_empty() {
                return Err(invalid(
                    path,
                    "[distill] needs a non-empty `preprompt` and a positive `max_new_tokens`",
                ));
            }
            if !(d.top_p > 0.0 && d.top_p <= 1.0 && d.temperature >= 0.0) {
                return Err(invalid(
                    path,
                    "[distill] `top_p` must be in (0, 1] and `temperature` >= 0",
                ));
            }
        }
        if !["f32", "bf16"].contains(&self.runtime.dtype.as_str()) {
            return Err(invalid(
                path,
                "[runtime] `dtype` must be \"f32\" or \"bf16\"",
            ));
        }
        Ok(())
    }

    pub fn micro_batch_size(&self) -> usize {
        self.train.micro_batch_size.unwrap_or(self.train.batch_size)
    }

    /// The resolved recipe as TOML, for the run's output directory. Fails only for a path that
    /// is not valid UTF-8, which [`Recipe::load`] refuses.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

/// The `--set` that turned a recipe that deserialized (or failed otherwise) into one failing with
/// `message`: the overrides are applied one at a time to the file's table.
fn blame_deserialize<'a>(
    file_table: &toml::Table,
    overrides: &'a [String],
    message: &str,
) -> Option<&'a str> {
    let mut table = file_table.clone();
    let mut before = Recipe::from_table(table.clone()).err();
    for assignment in overrides {
        apply_override(&mut table, assignment).ok()?;
        let after = Recipe::from_table(table.clone()).err();
        if after.as_deref() == Some(message) && before.as_deref() != Some(message) {
            return Some(assignment.trim());
        }
        before = after;
    }
    None
}

/// Whether a validation message (`[section] \`key\` ...`) is about the key `assignment` sets.
fn override_named_in(assignment: &str, message: &str) -> bool {
    let Some((key, _)) = assignment.split_once('=') else {
        return false;
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    match parts.as_slice() {
        [section, .., name] => {
            message.contains(&format!("[{section}]")) && message.contains(&format!("`{name}`"))
        }
        _ => false,
    }
}
