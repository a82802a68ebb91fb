//! Hugging Face checkpoint directories: import (weights read through `shards.rs`, named by
//! `weights.rs`; f32/f16/bf16), random initialisation, and atomic export.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

use crate::config::LlamaConfig;
use crate::error::{io_err, LlamaError, Result};
use crate::lora;
use crate::model::{Head, Llama};
use crate::shards::{is_ignorable, SafetensorsDir};
use crate::weights::{build_llama, hf_params};

/// Loads `config.json` and the weights of a Hugging Face Llama checkpoint directory, with the
/// head it holds: `LlamaForCausalLM`, or `LlamaForSequenceClassification` (a reward model).
pub fn load_pretrained(dir: &Path, device: &Device) -> Result<(LlamaConfig, Llama)> {
    load_pretrained_with_ids(dir, device, None)
}

/// [`load_pretrained`], giving parameters the ids they had when saved (for resuming).
pub fn load_pretrained_with_ids(
    dir: &Path,
    device: &Device,
    ids: Option<&HashMap<String, u64>>,
) -> Result<(LlamaConfig, Llama)> {
    load_dir(dir, device, None, ids, 0, 0)
}

/// Loads a checkpoint with the requested head. A scalar head that the checkpoint lacks (an SFT
/// or base model becoming a reward or value model) starts near zero from `seed`, and a
/// language-model head in the file is then left unused. Asking for a language-model head from
/// a reward model is an error.
pub fn load_pretrained_as(
    dir: &Path,
    device: &Device,
    head: Head,
    seed: u64,
) -> Result<(LlamaConfig, Llama)> {
    load_dir(dir, device, Some(head), None, seed, 0)
}

/// A LoRA adapter directory (ours or PEFT's) on its base, with the adapters attached and not
/// merged, for training on: the base is loaded with `head` (by default the adapter's task), its
/// target projections quantised as `quantize` says, and the factors (and a saved scalar head)
/// read back with the ids in `ids`.
pub fn load_adapter_dir(
    dir: &Path,
    device: &Device,
    head: Option<Head>,
    ids: Option<&HashMap<String, u64>>,
    seed: u64,
    quantize: lora::BaseQuant,
) -> Result<(LlamaConfig, Llama)> {
    load_adapter(dir, device, head, ids, seed, quantize, 0)
}

/// How many adapter directories may stand on each other (an adapter whose base is an adapter
/// directory): beyond this, a cycle is assumed.
const MAX_ADAPTER_DEPTH: usize = 8;

fn load_adapter(
    dir: &Path,
    device: &Device,
    head: Option<Head>,
    ids: Option<&HashMap<String, u64>>,
    seed: u64,
    quantize: lora::BaseQuant,
    depth: usize,
) -> Result<(LlamaConfig, Llama)> {
    let adapter = lora::read_adapter_config(dir)?;
    let base = adapter.base_dir(dir);
    if depth >= MAX_ADAPTER_DEPTH {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: format!(
                "adapter directories stand on each other more than {MAX_ADAPTER_DEPTH} deep \
                 (a cycle through base_model_name_or_path?)"
            ),
        });
    }
    let stored = adapter.head();
    let head = head.unwrap_or(stored);
    if head == Head::Lm && stored == Head::Score {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "this is a reward model adapter (a scalar `score` head): it has no \
                      language-model head to generate or train with"
                .into(),
        });
    }
    let (mut config, model) =
        load_dir(&base, device, Some(head), ids, seed, depth + 1).map_err(|e| {
            LlamaError::Config {
                path: dir.join(lora::ADAPTER_CONFIG),
                message: format!("loading its base model {}: {e}", base.display()),
            }
        })?;
    if head == Head::Score && config.pad_token_id.is_none() {
        // A reward model trained on a base without a pad id padded with 0 (as `train reward`
        // does), and its merged export must say so for transformers to find the last token.
        config.pad_token_id = Some(0);
    }
    let weights = SafetensorsDir::open_file(&dir.join(lora::ADAPTER_WEIGHTS))?;
    lora::check_no_unexpected(&weights, config.num_hidden_layers, &adapter.target_modules)?;
    let mut model = lora::attach(
        model,
        &adapter.spec(quantize),
        lora::Factors::Saved(&weights),
        ids,
    )?;
    if head == Head::Score {
        if let Some(values) = lora::saved_score(&weights, config.hidden_size) {
            lora::set_score(&mut model, values?);
        }
    }
    Ok((config, model))
}

fn load_dir(
    dir: &Path,
    device: &Device,
    head: Option<Head>,
    ids: Option<&HashMap<String, u64>>,
    seed: u64,
    depth: usize,
) -> Result<(LlamaConfig, Llama)> {
    if !dir.is_dir() {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "model directory not found".into(),
        });
    }
    let config_path = dir.join("config.json");
    if !config_path.exists() && dir.join(lora::ADAPTER_CONFIG).exists() {
        // Inference and export read an adapter directory merged into its base.
        let (config, model) =
            load_adapter(dir, device, head, ids, seed, lora::BaseQuant::None, depth)?;
        // Attaching froze the base; merged, every weight trains again (full fine-tuning from
        // a LoRA checkpoint), as a model read from a full checkpoint does.
        return Ok((config, lora::merge(model).set_require_grad(true)));
    }
    if !config_path.exists() {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "no config.json in this model directory".into(),
        });
    }
    let config = LlamaConfig::from_hf_file(&config_path)?;
    check_host_memory(&config, device)?;
    let weights = SafetensorsDir::open(dir)?;
    let has_score = weights.names().any(|n| n == "score.weight");
    let has_lm_head = weights.names().any(|n| n == "lm_head.weight");
    let stored = if has_score && !has_lm_head {
        Head::Score
    } else {
        Head::Lm
    };
    let head = head.unwrap_or(stored);
    if head == Head::Lm && stored == Head::Score {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "this is a reward model (a scalar `score` head): it has no language-model \
                      head to generate or train with"
                .into(),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut used = Vec::new();
    let model = build_llama(
        &config,
        device,
        head,
        &mut |name, shape| {
            if name == "score.weight" && !has_score {
                return Ok(init_values(name, shape, &mut rng));
            }
            used.push(name.to_string());
            weights.read_f32(name, shape)
        },
        ids,
    )?;
    let mut unexpected: Vec<&str> = weights
        .names()
        .filter(|n| {
            let dropped_head = head == Head::Score && *n == "lm_head.weight";
            !(used.iter().any(|u| u == n) || is_ignorable(n) || dropped_head)
        })
        .collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        return Err(LlamaError::Safetensors {
            path: weights.file_for(first).to_path_buf(),
            message: format!(
                "unexpected tensor `{first}` ({} unexpected in all): not a plain Llama checkpoint",
                unexpected.len()
            ),
        });
    }
    Ok((config, model))
}

/// A model with freshly initialised weights: normal(0, 0.02) for matrices as in the Llama
/// reference code, ones for the norms. The same seed gives the same model.
pub fn init_random(config: &LlamaConfig, device: &Device, seed: u64) -> Result<Llama> {
    init_random_with_head(config, device, Head::Lm, seed)
}

/// [`init_random`] with the given head.
pub fn init_random_with_head(
    config: &LlamaConfig,
    device: &Device,
    head: Head,
    seed: u64,
) -> Result<Llama> {
    check_host_memory(config, device)?;
    let mut rng = StdRng::seed_from_u64(seed);
    build_llama(
        config,
        device,
        head,
        &mut |name, shape| Ok(init_values(name, shape, &mut rng)),
        None,
    )
}

/// Refuses, before allocating anything, a model whose f32 weights alone cannot fit in the
/// memory available to a CPU device: the allocation would otherwise abort the process. GPU
/// devices hold only one tensor at a time on the host while loading, so they are not checked.
fn check_host_memory(config: &LlamaConfig, device: &Device) -> Result<()> {
    let Some(available) = crate::device::host_memory_available(device) else {
        return Ok(());
    };
    let needed = config.parameter_count().saturating_mul(4);
    if needed > available {
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        return Err(LlamaError::Invalid(format!(
            "the model's {} parameters need {:.1} GiB as f32, but only {:.1} GiB of memory is \
             available",
            config.parameter_count(),
            gib(needed),
            gib(available)
        )));
    }
    Ok(())
}

/// Initial values of one tensor: ones for norms; for the scalar head, normal with standard
/// deviation 0.02 / sqrt(hidden), so that scores start near zero whatever the width; normal(0,
/// 0.02) for every other matrix.
fn init_values(name: &str, shape: &[usize], rng: &mut StdRng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        return vec![1.0; n];
    }
    let std = if name == "score.weight" {
        0.02 / (n as f32).sqrt()
    } else {
        0.02
    };
    (0..n).map(|_| std * standard_normal(rng)).collect()
}

/// Box-Muller; enough for initialisation and keeps the dependency list short.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Storage dtype of an exported checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
    BF16,
}

impl SaveDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Self::F32),
            "f16" | "float16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    pub(crate) fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    pub(crate) fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

/// How to write a checkpoint.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    pub dtype: SaveDtype,
    /// Shards are cut before a tensor that would take a file past this size.
    pub max_shard_bytes: u64,
    /// Files copied next to the weights when present (tokenizer and its configs).
    pub extra_files: Vec<PathBuf>,
    /// Files written next to the weights after the copies (name, JSON content).
    pub extra_json: Vec<(String, serde_json::Value)>,
    /// Replace an existing output directory.
    pub overwrite: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: SaveDtype::F32,
            max_shard_bytes: 5 * 1000 * 1000 * 1000,
            extra_files: Vec::new(),
            extra_json: Vec::new(),
            overwrite: false,
        }
    }
}

/// Tokenizer files that travel with a checkpoint.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes `model` as a Hugging Face `LlamaForCausalLM` directory. The directory is assembled
/// under a hidden temporary name beside `out` and renamed into place at the end, so an
/// interrupted export never leaves a directory that looks complete.
pub fn save_pretrained(
    model: &Llama,
    config: &LlamaConfig,
    out: &Path,
    options: &SaveOptions,
) -> Result<()> {
    write_atomically(out, options.overwrite, |partial| {
        write_model_files(model, config, partial, options)
    })
}

/// Copies a LoRA adapter directory (ours or PEFT's) to `out` as a PEFT adapter directory,
/// atomically: `adapter_config.json` (with `base_model_name_or_path` replaced by `base_name`
/// when given, e.g. a Hub id for publishing), `adapter_model.safetensors` and `extra_files`.
pub fn export_adapter(
    dir: &Path,
    out: &Path,
    base_name: Option<&str>,
    extra_files: &[PathBuf],
    overwrite: bool,
) -> Result<()> {
    let config_path = dir.join(lora::ADAPTER_CONFIG);
    if !config_path.is_file() {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "not a LoRA checkpoint (no adapter_config.json): --adapter exports the \
                      adapters of a run trained with [lora]"
                .into(),
        });
    }
    lora::read_adapter_config(dir)?;
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LlamaError::Config {
            path: config_path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
    if let Some(name) = base_name {
        json["base_model_name_or_path"] = name.into();
    }
    let weights = dir.join(lora::ADAPTER_WEIGHTS);
    // Read it once, so a corrupt file is refused before anything is written.
    SafetensorsDir::open_file(&weights)?;
    write_atomically(out, overwrite, |partial| {
        write_json(&partial.join(lora::ADAPTER_CONFIG), &json)?;
        let dest = partial.join(lora::ADAPTER_WEIGHTS);
        std::fs::copy(&weights, &dest).map_err(io_err(&weights))?;
        write_extras(partial, extra_files, &[])
    })
}

/// Fills a hidden directory beside `out` with `fill` and renames it into place, so an
/// interrupted write never leaves a directory that looks complete. An existing `out` is
/// replaced only with `overwrite`, and only when it is a model or adapter directory.
pub(crate) fn write_atomically(
    out: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if out.exists() {
        if !overwrite {
            return Err(LlamaError::Invalid(format!(
                "{}: output directory already exists (use --overwrite to replace it)",
                out.display()
            )));
        }
        check_replaceable_model_dir(out)?;
    }
    let partial = sibling(out, "partial")?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
    fill(&partial)?;
    sync_dir(&partial);

    if out.exists() {
        let old = sibling(out, "old")?;
        std::fs::rename(out, &old).map_err(io_err(out))?;
        std::fs::rename(&partial, out).map_err(io_err(out))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        std::fs::rename(&partial, out).map_err(io_err(out))?;
    }
    if let Some(parent) = out.parent() {
        sync_dir(parent);
    }
    Ok(())
}

fn write_model_files(
    model: &Llama,
    config: &LlamaConfig,
    partial: &Path,
    options: &SaveOptions,
) -> Result<()> {
    write_weights(model, partial, options)?;
    let mut config_json = match model.head() {
        Head::Lm => config.to_hf_json("LlamaForCausalLM", options.dtype.torch_name()),
        Head::Score => {
            if config.pad_token_id.is_none() {
                return Err(LlamaError::Invalid(
                    "a reward model needs `pad_token_id`: transformers finds the last real \
                     token of each sequence by it"
                        .into(),
                ));
            }
            let mut json =
                config.to_hf_json("LlamaForSequenceClassification", options.dtype.torch_name());
            json["num_labels"] = 1.into();
            json["id2label"] = serde_json::json!({"0": "LABEL_0"});
            json["label2id"] = serde_json::json!({"LABEL_0": 0});
            json
        }
    };
    if model.head() == Head::Score {
        // There is no output embedding to tie.
        config_json["tie_word_embeddings"] = false.into();
    }
    write_json(&partial.join("config.json"), &config_json)?;
    let mut generation = serde_json::json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    });
    if let Some(pad) = config.pad_token_id {
        generation["pad_token_id"] = pad.into();
    }
    if model.head() == Head::Lm {
        write_json(&partial.join("generation_config.json"), &generation)?;
    }
    write_extras(partial, &options.extra_files, &options.extra_json)
}

/// Copies `files` into `dir`, then writes the generated `json` files (which win over a copy
/// of the same name).
pub(crate) fn write_extras(
    dir: &Path,
    files: &[PathBuf],
    json: &[(String, serde_json::Value)],
) -> Result<()> {
    for file in files {
        if let Some(name) = file.file_name() {
            std::fs::copy(file, dir.join(name)).map_err(io_err(file))?;
        }
    }
    for (name, value) in json {
        write_json(&dir.join(name), value)?;
    }
    Ok(())
}

/// `--overwrite` replaces a model directory, never a file or a directory of other things.
fn check_replaceable_model_dir(out: &Path) -> Result<()> {
    if !out.is_dir() {
        return Err(LlamaError::Invalid(format!(
            "{}: exists and is not a directory; not replacing it",
            out.display()
        )));
    }
    let empty = std::fs::read_dir(out)
        .map_err(io_err(out))?
        .next()
        .is_none();
    let model = out.join("config.json").is_file()
        || out.join(lora::ADAPTER_CONFIG).is_file()
        || (out.join("params.json").is_file() && out.join("consolidated.00.pth").is_file());
    if !empty && !model {
        return Err(LlamaError::Invalid(format!(
            "{}: holds files but no model (no config.json, adapter_config.json or Meta's params.json); not \
             replacing it",
            out.display()
        )));
    }
    Ok(())
}

/// `<parent>/.<name>.<tag>-<pid>`: hidden, and on the same file system as `out` so the final
/// rename is atomic.
fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| LlamaError::Invalid(format!("{}: not a directory name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn sync_dir(dir: &Path) {
    // Best effort: not every file system supports syncing a directory handle.
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialize");
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

fn write_weights(model: &Llama, dir: &Path, options: &SaveOptions) -> Result<()> {
    let params = hf_params(model);
    let layout: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|(name, param)| (name.clone(), param.hf_shape()))
        .collect();
    write_safetensors_shards(
        dir,
        &layout,
        options.dtype.safetensors(),
        options.max_shard_bytes,
        |i| Ok(options.dtype.encode(&params[i].1.to_host())),
    )
}

/// Writes tensors (name and shape; all of `dtype`) as `model.safetensors`, or as
/// `model-NNNNN-of-NNNNN.safetensors` shards of at most `max_shard_bytes` with an index.
/// `bytes(i)` gives tensor `i`'s little-endian data; only one shard is held at a time.
pub(crate) fn write_safetensors_shards(
    dir: &Path,
    layout: &[(String, Vec<usize>)],
    dtype: Dtype,
    max_shard_bytes: u64,
    mut bytes: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    // Plan the shards from the shapes alone, then convert one shard at a time.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    let mut total = 0u64;
    for (i, (_, shape)) in layout.iter().enumerate() {
        let size = (shape.iter().product::<usize>() * dtype.bitsize() / 8) as u64;
        let current = shards.last_mut().expect("one shard at least");
        if !current.is_empty() && shard_bytes + size > max_shard_bytes {
            shards.push(vec![i]);
            shard_bytes = size;
        } else {
            current.push(i);
            shard_bytes += size;
        }
        total += size;
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (s, members) in shards.iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, count)
        };
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = members
            .iter()
            .map(|&i| Ok((layout[i].0.clone(), layout[i].1.clone(), bytes(i)?)))
            .collect::<Result<_>>()?;
        let views = encoded
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(dtype, shape.clone(), data).map(|view| (name.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| LlamaError::Invalid(format!("building safetensors view: {e}")))?;
        let path = dir.join(&file_name);
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path).map_err(|e| {
            LlamaError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
        if let Ok(file) = File::open(&path) {
            let _ = file.sync_all();
        }
        for (name, _, _) in &encoded {
            weight_map.insert(name.clone(), file_name.clone());
        }
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(())
}
