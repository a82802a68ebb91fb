//! LoRA and QLoRA on the decoder's linear projections, through burn's own reparameterisation:
//! `burn::module::Lora` attaches a `LoraAdapter` (effective weight `base + alpha / rank * a @ b`)
//! to each target weight and freezes every other parameter, and burn's `Quantizer` packs the
//! frozen projections first for QLoRA. What is ours: which weights are targets, how the factors
//! start (PEFT's initialisation, drawn from the run's seed so a run is reproducible) or are read
//! back from a checkpoint, and the PEFT adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors`) that checkpoints and `train export --adapter` write.
//!
//! Layouts: burn keeps a linear weight as `[in, out]` and the factors as `a: [in, rank]`,
//! `b: [rank, out]`; PEFT stores `lora_A.weight: [rank, in]` and `lora_B.weight: [out, rank]`,
//! the transposes, with the same scale `alpha / rank`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Lora, Module, Param, ParamGroup, ParamId, Quantizer, Reparameterizer};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::quantization::{Calibration, QuantValue, ScaleDtype};
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{io_err, LlamaError, Result};
use crate::model::{to_host, Head, Llama};
use crate::shards::SafetensorsDir;
use crate::weights::transpose;

/// The projections an adapter can target, by their Hugging Face module names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix before the wrapped model's own parameter names.
const PEFT_PREFIX: &str = "base_model.model.";

/// How the frozen base projections are stored during LoRA training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseQuant {
    /// In the run's float dtype (plain LoRA).
    #[default]
    None,
    /// 8-bit symmetric, one scale per block of 32 values (QLoRA with an 8-bit base).
    Q8,
    /// 4-bit symmetric, one scale per block of 32 values (QLoRA).
    Q4,
}

impl BaseQuant {
    /// Bytes per stored base value, scales included (for the memory plan). Backends that keep
    /// 4-bit values unpacked (flex stores one per byte) use more.
    pub fn bytes_per_value(self) -> Option<f64> {
        match self {
            BaseQuant::None => None,
            BaseQuant::Q8 => Some(1.0 + 4.0 / BLOCK as f64),
            BaseQuant::Q4 => Some(0.5 + 4.0 / BLOCK as f64),
        }
    }
}

/// Values per quantisation block (fewer when a target's output width is not a multiple).
const BLOCK: u8 = 32;

/// The largest block of at most [`BLOCK`] values that divides every target projection's output
/// width (Llama 2's widths are all multiples of 32); `None` below 8, where one scale per tensor
/// is used instead.
fn block_size(model: &Llama, targets: &[String]) -> Option<u8> {
    let widths = projections(model)
        .into_iter()
        .filter(|(module, kind, _)| {
            module.starts_with("model.layers.0.") && targets.iter().any(|t| t == kind)
        })
        .map(|(_, _, linear)| linear.weight.dims()[1]);
    let gcd = widths.fold(BLOCK as usize, |g, w| {
        let (mut x, mut y) = (g, w);
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    });
    (gcd >= 8).then_some(gcd as u8)
}

/// Which projections get adapters, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Module names from [`TARGETS`].
    pub targets: Vec<String>,
    pub quantize: BaseQuant,
}

impl LoraSpec {
    /// The scale of the low-rank update, `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Where adapter factors come from.
pub enum Factors<'a> {
    /// PEFT's default initialisation: `A` uniform in ±1/sqrt(in) (Kaiming-uniform with a =
    /// sqrt(5)), `B` zero, so the adapted model starts equal to its base. Drawn per module
    /// from this seed.
    Fresh(u64),
    /// Saved factors under their PEFT names (an adapter directory's weights).
    Saved(&'a SafetensorsDir),
}

/// The Hugging Face module (`model.layers.3.self_attn.q_proj`) and its kind (`q_proj`) of a
/// burn parameter path (`layers.3.self_attn.q_proj.weight`), for decoder projections only.
fn projection(path: &str) -> Option<(String, &str)> {
    let module = path.strip_prefix("layers.")?.strip_suffix(".weight")?;
    let kind = module.rsplit('.').next()?;
    TARGETS
        .contains(&kind)
        .then(|| (format!("model.layers.{module}"), kind))
}

/// Attaches burn's [`Lora`] to every target projection, factors from `factors`; every other
/// parameter is frozen except a scalar head (a reward or value model trains its `score`). With
/// `spec.quantize`, the target projections are quantised first (QLoRA). `ids` gives the factors
/// the ids a resumed optimizer state refers to, by the names [`adapter_ids`] lists.
pub fn attach(
    model: Llama,
    spec: &LoraSpec,
    factors: Factors<'_>,
    ids: Option<&HashMap<String, u64>>,
) -> Result<Llama> {
    if spec.rank == 0 || spec.targets.is_empty() {
        return Err(LlamaError::Invalid(
            "LoRA needs a rank >= 1 and at least one target module".into(),
        ));
    }
    let model = match spec.quantize {
        BaseQuant::None => model,
        quant => {
            let value = match quant {
                BaseQuant::Q8 => QuantValue::Q8S,
                _ => QuantValue::Q4S,
            };
            let device = model.device();
            let scheme = device.settings().quantization.scheme.with_value(value);
            let scheme = match block_size(&model, &spec.targets) {
                Some(block) => scheme.per_block([block], ScaleDtype::F32),
                None => scheme.per_tensor(ScaleDtype::F32),
            };
            let mut quantizer = Quantizer::new(Calibration::MinMax, scheme);
            let pattern = format!(
                r"^layers\.\d+\.(self_attn|mlp)\.({})\.weight$",
                spec.targets.join("|")
            );
            let group = ParamGroup::from_regex(&pattern)
                .map_err(|e| LlamaError::Invalid(format!("LoRA targets: {e:?}")))?;
            model.quantize_weights_group(&mut quantizer, group)
        }
    };
    let mut error = None;
    let attach = Attach {
        lora: Lora::new(spec.rank, spec.alpha),
        spec,
        factors,
        ids,
        error: &mut error,
    };
    let model = model.apply_reparameterization(attach);
    match error {
        Some(error) => Err(error),
        None => Ok(model),
    }
}

struct Attach<'a> {
    lora: Lora,
    spec: &'a LoraSpec,
    factors: Factors<'a>,
    ids: Option<&'a HashMap<String, u64>>,
    error: &'a mut Option<LlamaError>,
}

impl Reparameterizer for Attach<'_> {
    type Reparam = burn::module::LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<Self::Reparam>) {
        if path == "score.weight" {
            return (param, None);
        }
        let target =
            projection(path).filter(|(_, kind)| self.spec.targets.iter().any(|t| t == kind));
        let Some((module, _)) = target else {
            return (param.set_require_grad(false), None);
        };
        let (base, adapter) = self.lora.reparameterize(path, param);
        let Some(mut adapter) = adapter else {
            return (base, None);
        };
        let ([d_in, rank], [_, d_out]) = (adapter.a.dims(), adapter.b.dims());
        let device = adapter.a.device();
        let dtype = adapter.a.val().dtype();
        let (a, b) = match self.factors_of(&module, d_in, rank, d_out) {
            Ok(values) => values,
            Err(error) => {
                self.error.get_or_insert(error);
                return (base, Some(adapter));
            }
        };
        let factor = |values: Vec<f32>, shape: [usize; 2], name: String| {
            let tensor = Tensor::<2>::from_data(TensorData::new(values, shape), &device);
            let mut param = Param::from_tensor(tensor.cast(dtype));
            if let Some(&id) = self.ids.and_then(|ids| ids.get(&name)) {
                param.id = ParamId::from(id);
            }
            param
        };
        adapter.a = factor(a, [d_in, rank], format!("{module}.lora_A.weight"));
        adapter.b = factor(b, [rank, d_out], format!("{module}.lora_B.weight"));
        (base, Some(adapter))
    }
}

impl Attach<'_> {
    /// `a` as `[in, rank]` and `b` as `[rank, out]`, row-major.
    fn factors_of(
        &self,
        module: &str,
        d_in: usize,
        rank: usize,
        d_out: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.factors {
            Factors::Fresh(seed) => {
                let mut rng = StdRng::seed_from_u64(seed ^ name_hash(module));
                let bound = 1.0 / (d_in as f64).sqrt();
                // Drawn in PEFT's `[rank, in]` order, then laid out as burn's `[in, rank]`.
                let a_peft: Vec<f32> = (0..rank * d_in)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                Ok((transpose(&a_peft, rank, d_in), vec![0.0; rank * d_out]))
            }
            Factors::Saved(weights) => {
                let a = weights.read_f32(&peft_name(module, "lora_A"), &[rank, d_in])?;
                let b = weights.read_f32(&peft_name(module, "lora_B"), &[d_out, rank])?;
                Ok((transpose(&a, rank, d_in), transpose(&b, d_out, rank)))
            }
        }
    }
}

/// FNV-1a, so each module's factors have their own stream whatever the traversal order.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn peft_name(module: &str, factor: &str) -> String {
    format!("{PEFT_PREFIX}{module}.{factor}.weight")
}

/// The adapted projections of a model with their Hugging Face module names, in layer order.
fn adapted(model: &Llama) -> Vec<(String, &Linear)> {
    projections(model)
        .into_iter()
        .filter(|(_, _, linear)| linear.weight.adapter().is_some())
        .map(|(module, _, linear)| (module, linear))
        .collect()
}

/// Every decoder projection with its Hugging Face module name and kind (`q_proj`, ...), in
/// checkpoint order, as [`crate::weights::hf_params`] names them.
fn projections(model: &Llama) -> Vec<(String, &'static str, &Linear)> {
    crate::weights::hf_params(model)
        .into_iter()
        .filter_map(|(name, param)| {
            let crate::weights::ParamRef::Linear(linear) = param else {
                return None;
            };
            let module = name.strip_suffix(".weight")?;
            let last = module.rsplit('.').next()?;
            let kind = TARGETS.into_iter().find(|k| *k == last)?;
            module
                .starts_with("model.layers.")
                .then(|| (module.to_string(), kind, linear))
        })
        .collect()
}

/// Whether any projection carries an adapter.
pub fn has_adapters(model: &Llama) -> bool {
    !adapted(model).is_empty()
}

/// The factors' ids by name (`model.layers.0.self_attn.q_proj.lora_A.weight`), to save beside
/// the optimizer state.
pub fn adapter_ids(model: &Llama) -> HashMap<String, u64> {
    let mut ids = HashMap::new();
    for (module, linear) in adapted(model) {
        if let Some(adapter) = linear.weight.adapter() {
            ids.insert(format!("{module}.lora_A.weight"), adapter.a.id.val());
            ids.insert(format!("{module}.lora_B.weight"), adapter.b.id.val());
        }
    }
    ids
}

/// Trainable values: the factors (and a scalar head), for counts and the memory plan.
pub fn trainable_parameters(model: &Llama) -> usize {
    let factors: usize = adapted(model)
        .iter()
        .filter_map(|(_, l)| l.weight.adapter())
        .map(|a| a.a.dims().iter().product::<usize>() + a.b.dims().iter().product::<usize>())
        .sum();
    factors
        + model
            .score
            .as_ref()
            .map_or(0, |s| s.weight.dims().iter().product())
}

/// The model with every adapter dropped: the frozen base, sharing its tensors (no copy). PPO
/// with LoRA uses it as the reference policy.
pub fn without_adapters(model: &Llama) -> Llama {
    let strip = |linear: &Linear| Linear {
        weight: Param::initialized(linear.weight.id, linear.weight.base()),
        bias: linear.bias.clone(),
    };
    let mut base = model.clone();
    for layer in &mut base.layers {
        let a = &mut layer.self_attn;
        for linear in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            if linear.weight.adapter().is_some() {
                *linear = strip(linear);
            }
        }
        let m = &mut layer.mlp;
        for linear in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
            if linear.weight.adapter().is_some() {
                *linear = strip(linear);
            }
        }
    }
    base
}

/// PEFT's `adapter_config.json`, the keys we write and read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub base_model_name_or_path: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub use_dora: bool,
}

impl AdapterConfig {
    pub fn head(&self) -> Head {
        if self.task_type == "SEQ_CLS" {
            Head::Score
        } else {
            Head::Lm
        }
    }

    /// The base model directory; a relative path is taken from the adapter directory.
    pub fn base_dir(&self, adapter_dir: &Path) -> PathBuf {
        let base = PathBuf::from(&self.base_model_name_or_path);
        if base.is_relative() {
            adapter_dir.join(base)
        } else {
            base
        }
    }

    pub fn spec(&self, quantize: BaseQuant) -> LoraSpec {
        LoraSpec {
            rank: self.r,
            alpha: self.lora_alpha,
            targets: self.target_modules.clone(),
            quantize,
        }
    }
}

/// Reads an adapter directory's `adapter_config.json`, refusing what we cannot apply.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| LlamaError::Config {
        path: path.clone(),
        message: format!("not a PEFT LoRA adapter config: {e}"),
    })?;
    let unsupported = |message: String| LlamaError::Config {
        path: path.clone(),
        message,
    };
    if config.peft_type != "LORA" {
        return Err(unsupported(format!(
            "peft_type `{}`: only LORA adapters are supported",
            config.peft_type
        )));
    }
    if config.use_rslora || config.use_dora {
        return Err(unsupported(
            "rsLoRA and DoRA adapters are not supported".into(),
        ));
    }
    if config.r == 0 {
        return Err(unsupported("`r` must be >= 1".into()));
    }
    let patterned = |p: &Option<serde_json::Map<String, serde_json::Value>>| {
        p.as_ref().is_some_and(|m| !m.is_empty())
    };
    if patterned(&config.rank_pattern) || patterned(&config.alpha_pattern) {
        return Err(unsupported(
            "per-module `rank_pattern` / `alpha_pattern` are not supported".into(),
        ));
    }
    if config.bias.as_deref().is_some_and(|b| b != "none") {
        return Err(unsupported(
            "adapter biases (`bias` other than \"none\") are not supported".into(),
        ));
    }
    // PEFT lists `classifier` beside `score` for sequence classification; Llama has only the
    // latter.
    if let Some(bad) = config
        .modules_to_save
        .iter()
        .flatten()
        .find(|m| !["score", "classifier"].contains(&m.as_str()))
    {
        return Err(unsupported(format!(
            "`modules_to_save` names `{bad}`: only a reward model's `score` head is supported"
        )));
    }
    if let Some(bad) = config
        .target_modules
        .iter()
        .find(|t| !TARGETS.contains(&t.as_str()))
    {
        return Err(unsupported(format!(
            "target module `{bad}` is not one of {}",
            TARGETS.join(", ")
        )));
    }
    Ok(config)
}

/// What an adapter directory says about its base and training.
pub struct AdapterInfo<'a> {
    pub spec: &'a LoraSpec,
    pub dropout: f64,
    /// Written as `base_model_name_or_path`.
    pub base: &'a Path,
}

/// Writes `model`'s adapters (and a scalar head, as PEFT's `modules_to_save`) into `dir` as a
/// PEFT adapter directory. `dir` must exist; files in it are replaced.
pub fn write_adapter(model: &Llama, info: &AdapterInfo<'_>, dir: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes = |values: Vec<f32>| values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (module, linear) in adapted(model) {
        let Some(adapter) = linear.weight.adapter() else {
            continue;
        };
        let ([d_in, rank], [_, d_out]) = (adapter.a.dims(), adapter.b.dims());
        let a = transpose(&to_host(adapter.a.val()), d_in, rank);
        let b = transpose(&to_host(adapter.b.val()), rank, d_out);
        tensors.push((peft_name(&module, "lora_A"), vec![rank, d_in], bytes(a)));
        tensors.push((peft_name(&module, "lora_B"), vec![d_out, rank], bytes(b)));
    }
    if let Some(score) = &model.score {
        let [d, one] = score.weight.dims();
        let values = transpose(&to_host(score.weight.val()), d, one);
        tensors.push((
            format!("{PEFT_PREFIX}score.weight"),
            vec![one, d],
            bytes(values),
        ));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| LlamaError::Invalid(format!("building safetensors view: {e}")))?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| {
        LlamaError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    let spec = info.spec;
    let score = model.score.is_some();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": if score { "SEQ_CLS" } else { "CAUSAL_LM" },
        "base_model_name_or_path": info.base.to_string_lossy(),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": info.dropout,
        "target_modules": spec.targets,
        "modules_to_save": if score { serde_json::json!(["score"]) } else { serde_json::Value::Null },
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("JSON values always serialize");
    std::fs::write(&path, text + "\n").map_err(io_err(&path))
}

/// Refuses an adapter file holding tensors its config does not account for (what a loader would
/// otherwise drop silently): only the factors of `targets` in `layers` layers and a scalar head.
pub(crate) fn check_no_unexpected(
    weights: &SafetensorsDir,
    layers: usize,
    targets: &[String],
) -> Result<()> {
    let mut expected = vec![format!("{PEFT_PREFIX}score.weight")];
    for layer in 0..layers {
        for target in targets {
            let mlp = ["gate_proj", "up_proj", "down_proj"].contains(&target.as_str());
            let block = if mlp { "mlp" } else { "self_attn" };
            let module = format!("model.layers.{layer}.{block}.{target}");
            expected.push(peft_name(&module, "lora_A"));
            expected.push(peft_name(&module, "lora_B"));
        }
    }
    let mut unexpected: Vec<&str> = weights
        .names()
        .filter(|n| !expected.iter().any(|e| e == n))
        .collect();
    unexpected.sort();
    match unexpected.first() {
        Some(first) => Err(LlamaError::Safetensors {
            path: weights.file_for(first).to_path_buf(),
            message: format!(
                "unexpected tensor `{first}` ({} unexpected in all): not an adapter of the \
                 target modules its adapter_config.json names",
                unexpected.len()
            ),
        }),
        None => Ok(()),
    }
}

/// Reads a saved scalar head from an adapter directory's weights, `[1, hidden]` in PyTorch
/// layout, if it holds one.
pub(crate) fn saved_score(weights: &SafetensorsDir, hidden: usize) -> Option<Result<Vec<f32>>> {
    let name = format!("{PEFT_PREFIX}score.weight");
    weights
        .names()
        .any(|n| n == name)
        .then(|| weights.read_f32(&name, &[1, hidden]))
}

/// Replaces the scalar head's values (PyTorch layout `[1, hidden]`), keeping its id.
pub(crate) fn set_score(model: &mut Llama, values: Vec<f32>) {
    if let Some(score) = &mut model.score {
        let device = score.weight.device();
        let hidden = values.len();
        let tensor = Tensor::<2>::from_data(TensorData::new(values, [hidden, 1]), &device);
        let mut weight = Param::from_tensor(tensor);
        weight.id = score.weight.id;
        score.weight = weight;
    }
}

/// Merges every adapter into its weight (`base + scale * a @ b`, burn's `materialize`).
pub fn merge(model: Llama) -> Llama {
    model.materialize()
}
