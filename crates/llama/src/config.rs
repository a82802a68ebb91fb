//! Architecture hyper-parameters: our TOML files in `configs/` and Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{io_err, LlamaError, Result};

/// The shape of a Llama 2 model. Field names follow Hugging Face's `LlamaConfig` so the same
/// words mean the same thing in our TOML files and in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: each KV head serves `num_attention_heads / num_key_value_heads`
    /// query heads. Equal to `num_attention_heads` for plain multi-head attention.
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling of long-context Llama 2 derivatives; `None` is plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Llama 2's tokenizer has no pad token; batching picks one and masks it everywhere.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// How a long-context derivative stretches RoPE, as `transformers` implements it for Llama.
/// In TOML: `rope_scaling = { type = "linear", factor = 4.0 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation: every position divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: past `max_position_embeddings` the base grows with the length of the pass,
    /// `theta * (factor * len / max_positions - (factor - 1))^(dim / (dim - 2))`.
    Dynamic { factor: f64 },
}

impl RopeScaling {
    pub fn factor(&self) -> f64 {
        match *self {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => factor,
        }
    }

    /// The name `transformers` gives it (`rope_type`).
    pub fn kind(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_bos() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}

/// Hugging Face `config.json` fields that are harmless bookkeeping, as `transformers` 4.x and
/// 5.x write them (5.x renamed `torch_dtype` to `dtype`). Anything not listed here and not read
/// below is refused by name rather than silently ignored.
const HF_IGNORED: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "pretraining_tp",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "attention_dropout",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
];

/// `transformers`' own defaults for fields a `config.json` leaves out (the same in 4.57 and
/// 5.x), so a sparse config means here what it means there. Our TOML files default to the
/// Llama 2 values instead.
const HF_DEFAULT_EPS: f64 = 1e-6;
const HF_DEFAULT_POSITIONS: usize = 2048;

/// Larger than any model this code could hold; also keeps the size arithmetic far from
/// overflowing `u64`.
pub const MAX_PARAMETERS: u64 = 10_000_000_000_000;

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The longest sequence the model takes: `max_position_embeddings`, times the factor for
    /// dynamic RoPE scaling (whose point is to run past it; linear-scaled derivatives record
    /// their stretched length in `max_position_embeddings` already).
    pub fn context_length(&self) -> usize {
        match self.rope_scaling {
            Some(RopeScaling::Dynamic { factor }) => {
                (self.max_position_embeddings as f64 * factor).min(usize::MAX as f64 / 2.0) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Checks the relations between fields that the model relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| LlamaError::Config {
            path: path.to_path_buf(),
            message,
        };
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(bad(format!("`{name}` must be positive")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "`hidden_size` {} is not divisible by `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(format!(
                "head dimension {} must be even for rotary embeddings",
                self.head_dim()
            )));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(format!(
                "`num_attention_heads` {} is not a multiple of `num_key_value_heads` {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err(bad(
                "`rms_norm_eps` and `rope_theta` must be positive".into()
            ));
        }
        if let Some(scaling) = self.rope_scaling {
            let factor = scaling.factor();
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(bad(format!(
                    "`rope_scaling.factor` {factor} must be a finite number >= 1"
                )));
            }
            if matches!(scaling, RopeScaling::Dynamic { .. }) && self.head_dim() <= 2 {
                return Err(bad(
                    "dynamic RoPE scaling needs a head dimension above 2".into()
                ));
            }
        }
        // An id past the vocabulary would index outside the embedding.
        let ids = [
            ("bos_token_id", Some(self.bos_token_id)),
            ("eos_token_id", Some(self.eos_token_id)),
            ("pad_token_id", self.pad_token_id),
        ];
        for (name, id) in ids {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return Err(bad(format!(
                    "`{name}` {id} is outside the vocabulary (`vocab_size` {})",
                    self.vocab_size
                )));
            }
        }
        match self.checked_parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => {}
            _ => {
                return Err(bad(format!(
                    "the model would have more than {MAX_PARAMETERS} parameters; check the sizes"
                )))
            }
        }
        Ok(())
    }

    /// Reads one of our architecture files (`configs/*.toml`).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let config: Self = toml::from_str(&text).map_err(|e| LlamaError::Config {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json` of a `LlamaForCausalLM` (or
    /// `LlamaForSequenceClassification`) checkpoint.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_hf_json(&text, path)
    }

    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| LlamaError::Config {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let unsupported = |field: &str, message: String| LlamaError::Unsupported {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        match object.get("model_type").and_then(|v| v.as_str()) {
            Some("llama") | None => {}
            Some(other) => {
                return Err(unsupported(
                    "model_type",
                    format!("`{other}` is not a Llama model (expected \"llama\")"),
                ))
            }
        }
        if let Some(archs) = object.get("architectures").and_then(|v| v.as_array()) {
            for arch in archs.iter().filter_map(|a| a.as_str()) {
                if !matches!(
                    arch,
                    "LlamaForCausalLM" | "LlamaForSequenceClassification" | "LlamaModel"
                ) {
                    return Err(unsupported(
                        "architectures",
                        format!("`{arch}` is not supported (expected LlamaForCausalLM)"),
                    ));
                }
            }
        }

        let mut config = LlamaConfig {
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_hidden_layers: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            max_position_embeddings: 0,
            rms_norm_eps: HF_DEFAULT_EPS,
            rope_theta: default_theta(),
            rope_scaling: None,
            tie_word_embeddings: false,
            bos_token_id: default_bos(),
            eos_token_id: default_eos(),
            pad_token_id: None,
        };
        let mut kv_heads_given = false;
        let mut rope_parameters = None;
        let mut legacy_scaling = None;
        for (key, value) in object {
            let as_usize = || {
                value
                    .as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| bad(format!("field `{key}` must be a non-negative integer")))
            };
            let as_f64 = || {
                value
                    .as_f64()
                    .ok_or_else(|| bad(format!("field `{key}` must be a number")))
            };
            let as_token = || -> Result<Option<u32>> {
                let id = |v: &serde_json::Value| {
                    v.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| bad(format!("field `{key}` must be a token id")))
                };
                match value {
                    serde_json::Value::Null => Ok(None),
                    // Several stop tokens (Llama 3); the first is the one we stop at.
                    serde_json::Value::Array(items) => items.first().map(id).transpose(),
                    other => id(other).map(Some),
                }
            };
            match key.as_str() {
                "vocab_size" => config.vocab_size = as_usize()?,
                "hidden_size" => config.hidden_size = as_usize()?,
                "intermediate_size" => config.intermediate_size = as_usize()?,
                "num_hidden_layers" => config.num_hidden_layers = as_usize()?,
                "num_attention_heads" => config.num_attention_heads = as_usize()?,
                "num_key_value_heads" => {
                    if !value.is_null() {
                        config.num_key_value_heads = as_usize()?;
                        kv_heads_given = true;
                    }
                }
                "max_position_embeddings" => config.max_position_embeddings = as_usize()?,
                "rms_norm_eps" => config.rms_norm_eps = as_f64()?,
                "rope_theta" => config.rope_theta = as_f64()?,
                "tie_word_embeddings" => {
                    config.tie_word_embeddings = value.as_bool().ok_or_else(|| {
                        bad("field `tie_word_embeddings` must be a boolean".into())
                    })?
                }
                "bos_token_id" => config.bos_token_id = as_token()?.unwrap_or(default_bos()),
                "eos_token_id" => config.eos_token_id = as_token()?.unwrap_or(default_eos()),
                "pad_token_id" => config.pad_token_id = as_token()?,
                "hidden_act" => {
                    if value.as_str() != Some("silu") {
                        return Err(unsupported(key, format!("{value} (only \"silu\")")));
                    }
                }
                "attention_bias" | "mlp_bias" => {
                    if value.as_bool() == Some(true) {
                        return Err(unsupported(key, "biases are not supported".into()));
                    }
                }
                "rope_scaling" => {
                    // 4.x: null, or {"type" | "rope_type": ..., "factor": ...}.
                    if !value.is_null() {
                        let (theta, scaling) = read_rope_dict(value, key, path)?;
                        if theta.is_some() {
                            return Err(unsupported(
                                "rope_scaling.rope_theta",
                                "belongs at the top level of a 4.x config".into(),
                            ));
                        }
                        legacy_scaling = Some(scaling);
                    }
                }
                "rope_parameters" => {
                    // transformers 5.x: {"rope_type": ..., "rope_theta": ..., "factor": ...}.
                    if !value.is_null() {
                        rope_parameters = Some(read_rope_dict(value, key, path)?);
                    }
                }
                "is_encoder_decoder" => {
                    if value.as_bool() == Some(true) {
                        return Err(unsupported(key, "a Llama model is a decoder only".into()));
                    }
                }
                "head_dim" => {
                    // Checked below, once hidden_size and the head count are known.
                }
                other if HF_IGNORED.contains(&other) => {}
                other => {
                    return Err(unsupported(
                        other,
                        "not understood by this Llama implementation".into(),
                    ))
                }
            }
        }
        for required in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ] {
            if !object.contains_key(required) {
                return Err(bad(format!("missing field `{required}`")));
            }
        }
        if !object.contains_key("max_position_embeddings") {
            config.max_position_embeddings = HF_DEFAULT_POSITIONS;
        }
        config.rope_scaling = legacy_scaling.flatten();
        if let Some((theta, scaling)) = rope_parameters {
            let legacy = object.get("rope_theta").and_then(|v| v.as_f64());
            if let Some(theta) = theta {
                if legacy.is_some_and(|legacy| legacy != theta) {
                    return Err(bad(format!(
                        "`rope_theta` {} and `rope_parameters.rope_theta` {theta} disagree",
                        legacy.unwrap_or_default()
                    )));
                }
                config.rope_theta = theta;
            }
            if legacy_scaling.is_some() && config.rope_scaling != scaling {
                return Err(bad(
                    "`rope_scaling` and `rope_parameters` describe different RoPE scalings".into(),
                ));
            }
            config.rope_scaling = scaling;
        }
        if !kv_heads_given {
            config.num_key_value_heads = config.num_attention_heads;
        }
        if let Some(head_dim) = object.get("head_dim").and_then(|v| v.as_u64()) {
            if config.num_attention_heads > 0
                && head_dim as usize * config.num_attention_heads != config.hidden_size
            {
                return Err(unsupported(
                    "head_dim",
                    format!(
                        "{head_dim} differs from hidden_size / num_attention_heads; not supported"
                    ),
                ));
            }
        }
        config.validate(path)?;
        Ok(config)
    }

    /// The `config.json` written on export, loadable by `transformers`, vLLM and llama.cpp.
    pub fn to_hf_json(&self, architecture: &str, torch_dtype: &str) -> serde_json::Value {
        serde_json::json!({
            "architectures": [architecture],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.map(|scaling| serde_json::json!({
                "rope_type": scaling.kind(),
                "factor": scaling.factor(),
            })),
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": torch_dtype,
        })
    }

    /// Exact number of parameters, computed from the shape alone. A validated config never
    /// overflows (see [`MAX_PARAMETERS`]).
    pub fn parameter_count(&self) -> u64 {
        self.checked_parameter_count().unwrap_or(u64::MAX)
    }

    /// Model FLOPs of one trained token in sequences of `seq_len` (PaLM's accounting, as MFU
    /// uses it): 2 per matrix weight forward, 2 more for the input gradient and 2 more for the
    /// weight gradient where weights are trained (`weight_gradients`; false for a frozen LoRA
    /// base), plus `12 * layers * hidden * seq_len` for attention's scores and weighted sums.
    /// The embedding lookup is free; recomputation (activation checkpointing) is not counted.
    pub fn training_flops_per_token(&self, seq_len: usize, weight_gradients: bool) -> f64 {
        let embedding = (self.vocab_size * self.hidden_size) as f64;
        let norms = ((2 * self.num_hidden_layers + 1) * self.hidden_size) as f64;
        let matmul_weights = self.parameter_count() as f64
            - norms
            - if self.tie_word_embeddings {
                0.0
            } else {
                embedding
            };
        let per_weight = if weight_gradients { 6.0 } else { 4.0 };
        let attention = 12.0 * (self.num_hidden_layers * self.hidden_size) as f64 * seq_len as f64;
        per_weight * matmul_weights + attention
    }

    /// The parameter count, or `None` when it does not fit in a `u64`.
    pub fn checked_parameter_count(&self) -> Option<u64> {
        let d = self.hidden_size as u64;
        let kv = (self.num_key_value_heads as u64)
            .checked_mul(d / self.num_attention_heads.max(1) as u64)?;
        let ff = self.intermediate_size as u64;
        let vocab = self.vocab_size as u64;
        let attention = d
            .checked_mul(d)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?;
        let mlp = d.checked_mul(ff)?.checked_mul(3)?;
        let per_layer = attention.checked_add(mlp)?.checked_add(d.checked_mul(2)?)?;
        let embedding = vocab.checked_mul(d)?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        (self.num_hidden_layers as u64)
            .checked_mul(per_layer)?
            .checked_add(embedding)?
            .checked_add(d)?
            .checked_add(head)
    }
}

/// A RoPE dict of either layout (4.x `rope_scaling`, 5.x `rope_parameters`, named `field`):
/// its theta if it holds one, and the scaling (`None` for plain RoPE). Types other than
/// default, linear and dynamic are refused by name.
fn read_rope_dict(
    value: &serde_json::Value,
    field: &str,
    path: &Path,
) -> Result<(Option<f64>, Option<RopeScaling>)> {
    let unsupported = |key: &str, message: String| LlamaError::Unsupported {
        path: path.to_path_buf(),
        field: format!("{field}.{key}"),
        message,
    };
    let bad = |message: String| LlamaError::Config {
        path: path.to_path_buf(),
        message,
    };
    let object = value
        .as_object()
        .ok_or_else(|| bad(format!("field `{field}` must be an object")))?;
    // 4.57 writes both spellings of the type; they must agree.
    let mut kind = None;
    for key in ["rope_type", "type"] {
        if let Some(value) = object.get(key) {
            let name = value
                .as_str()
                .ok_or_else(|| bad(format!("field `{field}.{key}` must be a string")))?;
            if kind.is_some_and(|kind| kind != name) {
                return Err(bad(format!(
                    "`{field}.rope_type` and `{field}.type` disagree"
                )));
            }
            kind = Some(name);
        }
    }
    let kind = kind.unwrap_or("default");
    if !matches!(kind, "default" | "linear" | "dynamic") {
        return Err(unsupported(
            "rope_type",
            format!("\"{kind}\" is not supported (default, linear and dynamic are)"),
        ));
    }
    let number = |key: &str, value: &serde_json::Value| {
        value
            .as_f64()
            .ok_or_else(|| bad(format!("field `{field}.{key}` must be a number")))
    };
    let (mut theta, mut factor) = (None, None);
    for (key, value) in object {
        match key.as_str() {
            "rope_type" | "type" => {}
            "rope_theta" => theta = Some(number(key, value)?),
            "factor" if kind != "default" => factor = Some(number(key, value)?),
            other => {
                return Err(unsupported(
                    other,
                    format!("not understood for RoPE type \"{kind}\""),
                ))
            }
        }
    }
    let factor =
        || factor.ok_or_else(|| bad(format!("`{field}` of type \"{kind}\" needs a `factor`")));
    let scaling = match kind {
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "dynamic" => Some(RopeScaling::Dynamic { factor: factor()? }),
        _ => None,
    };
    Ok((theta, scaling))
}

/// Reads an architecture: a TOML file of ours or a Hugging Face `config.json` (or a directory
/// holding one).
pub fn load_config(path: &Path) -> Result<LlamaConfig> {
    if path.is_dir() {
        let json = path.join("config.json");
        if !json.exists() {
            return Err(LlamaError::Config {
                path: path.to_path_buf(),
                message: "no config.json in this model directory".into(),
            });
        }
        return LlamaConfig::from_hf_file(&json);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => LlamaConfig::from_hf_file(path),
        _ => LlamaConfig::from_toml_file(path),
    }
}
