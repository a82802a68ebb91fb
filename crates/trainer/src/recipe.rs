//! Recipes: TOML files with `[model]`, `[data]`, `[train]`, `[runtime]` and `[output]`, plus at
//! most one section a method owns (`[reward]`, `[ppo]`, ...): the core carries it, the method
//! defines, resolves and checks it through [`Section`].
//!
//! Unknown keys and wrong types are errors naming the key and the file; a file that does not
//! parse gives its line and column. `--set section.key=value` overrides any value before the
//! recipe is checked, and a problem it causes is blamed on it. Relative paths are resolved
//! against the recipe's directory (and normalised: `recipes/../runs/x` is `runs/x`), and the
//! fully resolved recipe can be written next to a run's outputs.

use std::path::{Path, PathBuf};

use data::DataConfig;
use serde::de::DeserializeOwned;
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

/// A method's own recipe section, e.g. `[ppo]`. Its type lives with the method; the core
/// reads it from the recipe (after `--set`), resolves its paths, checks it, and writes it back
/// into the run's `recipe.toml`.
pub trait Section: Serialize + DeserializeOwned {
    /// The table's name in the recipe.
    const NAME: &'static str;

    /// Calls `resolve` on every path the section holds (made relative to the recipe file).
    fn resolve_paths(&mut self, _resolve: &mut dyn FnMut(&mut PathBuf)) {}

    /// Checks values the types alone cannot. The message names the key as
    /// `` [name] `key` ``, so a `--set` that set it is blamed.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A recipe without a method section (`train sft`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NoSection;

impl Section for NoSection {
    const NAME: &'static str = "";
}

/// Any method's section, unread ([`Recipe::load_any`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct AnySection;

const ANY: &str = "*";
const CORE_SECTIONS: [&str; 6] = ["model", "data", "train", "runtime", "output", "lora"];

impl Section for AnySection {
    const NAME: &'static str = ANY;
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
    /// Keep only each decoder layer's input from the forward pass and recompute the layer in
    /// the backward pass: less memory, one more forward pass, the same numbers.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Positions per chunk of the language-model head and the loss (SFT's cross-entropy, PPO's
    /// token log-probabilities), so the whole `[batch, time, vocab]` logits never exist at
    /// once; 0: all positions at once.
    #[serde(default)]
    pub loss_chunk: usize,
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

/// How a run stores and computes: `runtime.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// Weights, gradients and AdamW moments in bf16 (8 bytes per parameter), computed in bf16.
    Bf16,
    /// f32 master weights, gradients and moments (16 bytes per parameter), computed in bf16.
    Bf16Mixed,
}

impl Precision {
    /// Bytes of one stored weight, gradient and AdamW moment.
    pub fn weight_bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            _ => 4,
        }
    }

    /// Bytes of one activation value.
    pub fn activation_bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            _ => 2,
        }
    }
}

impl RuntimeSection {
    /// The checked `dtype`; anything else was refused when the recipe was loaded.
    pub fn precision(&self) -> Precision {
        match self.dtype.as_str() {
            "bf16" => Precision::Bf16,
            "bf16-mixed" => Precision::Bf16Mixed,
            _ => Precision::F32,
        }
    }
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            device: default_device(),
            dtype: default_dtype(),
        }
    }
}

/// `[lora]`: train low-rank adapters on a frozen (optionally quantised) base instead of every
/// weight. Applies to every trained model of the run (SFT's policy, the reward model, PPO's
/// policy and value model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub rank: usize,
    /// The update is scaled by `alpha / rank`; default `2 * rank`.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input (PEFT's `lora_dropout`), in training passes only.
    #[serde(default)]
    pub dropout: f64,
    /// Projections that get adapters: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// `none`, `q8` or `q4` (QLoRA): how the frozen target projections are stored.
    #[serde(default)]
    pub quantize_base: llama::lora::BaseQuant,
}

fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

impl LoraSection {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    /// The settings as the model crate takes them.
    pub fn spec(&self) -> llama::lora::LoraSpec {
        llama::lora::LoraSpec {
            rank: self.rank,
            alpha: self.alpha(),
            targets: self.targets.clone(),
            quantize: self.quantize_base,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("[lora] `rank` must be >= 1".into());
        }
        if self.alpha.is_some_and(|a| !(a > 0.0 && a.is_finite())) {
            return Err("[lora] `alpha` must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("[lora] `dropout` must be within [0, 1)".into());
        }
        if self.targets.is_empty() {
            return Err("[lora] `targets` must name at least one projection".into());
        }
        let known = llama::lora::TARGETS;
        if let Some(bad) = self.targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(format!(
                "[lora] `targets`: `{bad}` is not one of {}",
                known.join(", ")
            ));
        }
        let mut sorted = self.targets.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.targets.len() {
            return Err("[lora] `targets` names a projection twice".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    /// The method's own section (`[reward]`, `[ppo]`, ...): its name and resolved values,
    /// carried for `recipe.toml`; the method reads it as its [`Section`] type.
    #[serde(skip)]
    pub section: Option<(String, toml::Value)>,
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
    /// Reads a recipe with no method section (`train sft`, `data inspect`), applies overrides,
    /// checks it, and resolves its paths.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        Self::load_with::<NoSection>(path, overrides).map(|(recipe, _)| recipe)
    }

    /// [`Recipe::load`] for a reader of the core sections only (`data inspect`): a method's
    /// section is ignored, whichever it is.
    pub fn load_any(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        Self::load_with::<AnySection>(path, overrides).map(|(recipe, _)| recipe)
    }

    /// [`Recipe::load`] for a method with the section `S`, which the recipe may hold (`None`
    /// when it does not); any other section is an error. A problem caused by a `--set` value
    /// is reported against that `--set`, not the file.
    pub fn load_with<S: Section>(
        path: &Path,
        overrides: &[String],
    ) -> Result<(Self, Option<S>), RecipeError> {
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
        let (mut recipe, mut section) = match Self::from_table::<S>(table) {
            Ok(parsed) => parsed,
            Err(message) => {
                let parse = |t: &toml::Table| Self::from_table::<S>(t.clone()).err();
                return Err(match blame(&file_table, overrides, &message, parse) {
                    Some(assignment) => RecipeError::Override(format!("{assignment}: {message}")),
                    None => invalid(path, message),
                });
            }
        };
        let base = path.parent().unwrap_or(Path::new(""));
        let mut resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        recipe.resolve_paths(&mut resolve);
        let checked = recipe.validate(path).and_then(|()| {
            let Some(section) = &mut section else {
                return Ok(());
            };
            section.resolve_paths(&mut resolve);
            section
                .validate()
                .map_err(|message| invalid(path, message))?;
            let value =
                toml::Value::try_from(&*section).map_err(|e| invalid(path, e.to_string()))?;
            recipe.section = Some((S::NAME.to_string(), value));
            Ok(())
        });
        checked.map_err(|error| match error {
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
        Ok((recipe, section))
    }

    /// The core sections, and the method's section `S` when the table has one.
    fn from_table<S: Section>(mut table: toml::Table) -> Result<(Self, Option<S>), String> {
        let section = match S::NAME {
            "" => None,
            ANY => {
                table.retain(|key, _| CORE_SECTIONS.contains(&key));
                None
            }
            name => table.remove(name),
        };
        if let Some(key) = table.keys().find(|k| !CORE_SECTIONS.contains(&k.as_str())) {
            let mut reads = CORE_SECTIONS.map(|s| format!("[{s}]")).join(", ");
            if !S::NAME.is_empty() {
                reads.push_str(&format!(" and [{}]", S::NAME));
            }
            let missing = match (&section, S::NAME) {
                (None, name) if !name.is_empty() => {
                    format!(", and the recipe has no [{name}] section")
                }
                _ => String::new(),
            };
            return Err(format!(
                "unknown section `[{key}]`: this command reads {reads}{missing}"
            ));
        }
        let recipe: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| one_line(&e.to_string()))?;
        let section = section
            .map(|value| {
                value.try_into::<S>().map_err(|e: toml::de::Error| {
                    format!("[{}] {}", S::NAME, one_line(&e.to_string()))
                })
            })
            .transpose()?;
        Ok((recipe, section))
    }

    fn resolve_paths(&mut self, fix: &mut dyn FnMut(&mut PathBuf)) {
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
        if t.max_steps == Some(0) {
            return Err(invalid(path, "[train] `max_steps` must be >= 1"));
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
        if let Some(lora) = &self.lora {
            lora.validate().map_err(|message| invalid(path, message))?;
        }
        if !["f32", "bf16", "bf16-mixed"].contains(&self.runtime.dtype.as_str()) {
            return Err(invalid(
                path,
                "[runtime] `dtype` must be \"f32\", \"bf16\" or \"bf16-mixed\"",
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
        let mut text = toml::to_string_pretty(self)?;
        if let Some((name, value)) = &self.section {
            let mut table = toml::Table::new();
            table.insert(name.clone(), value.clone());
            text.push('\n');
            text.push_str(&toml::to_string_pretty(&table)?);
        }
        Ok(text)
    }
}

/// The `--set` that turned a recipe that parsed (or failed otherwise) into one failing with
/// `message`: the overrides are applied one at a time to the file's table, and `parse` gives
/// each table's error.
fn blame<'a>(
    file_table: &toml::Table,
    overrides: &'a [String],
    message: &str,
    parse: impl Fn(&toml::Table) -> Option<String>,
) -> Option<&'a str> {
    let mut table = file_table.clone();
    let mut before = parse(&table);
    for assignment in overrides {
        apply_override(&mut table, assignment).ok()?;
        let after = parse(&table);
        if after.as_deref() == Some(message) && before.as_deref() != Some(message) {
            return Some(assignment.trim());
        }
        before = after;
    }
    None
}

/// `a/b/../c` as `a/c`, without touching the file system: printed paths then read as a user
/// would write them. A leading `..` (above the start) is kept.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                match out.components().next_back() {
                    Some(Component::Normal(_)) => {
                        out.pop();
                    }
                    // Above the root is the root.
                    Some(Component::RootDir | Component::Prefix(_)) => {}
                    _ => out.push(".."),
                }
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
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
