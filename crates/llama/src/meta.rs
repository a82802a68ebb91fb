//! Meta's original Llama 2 layout: `params.json` and `consolidated.NN.pth`, one PyTorch state
//! dict per model-parallel rank, read with burn's PyTorch reader and written with a small
//! pickle writer of our own.
//!
//! The ranks split each matrix as Meta's `fairscale` layers do: column-parallel weights (`wq`,
//! `wk`, `wv`, `w1`, `w3`, `output`) by rows, row-parallel ones (`wo`, `w2`) and the embedding
//! by columns; norms are whole in every rank. Meta's `wq`/`wk` rows hold each head's rotary
//! pairs interleaved (`x0, y0, x1, y1, ...`); Hugging Face's hold the halves (`x0, x1, ...,
//! y0, y1, ...`), so those two are permuted on the way in and back on the way out.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn_store::pytorch::PytorchReader;
use pytorch_reader::DType as TorchDType;
use serde::Deserialize;

use crate::checkpoint::{
    write_atomically, write_extras, write_json, write_safetensors_shards, SaveDtype,
};
use crate::config::LlamaConfig;
use crate::error::{io_err, LlamaError, Result};
use crate::weights::hf_params;
use crate::Llama;

/// `params.json` of Meta's download (Llama 2; Code Llama adds `rope_theta`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaParams {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// -1 in Meta's files: the tokenizer decides.
    #[serde(default = "minus_one")]
    pub vocab_size: i64,
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    #[serde(default)]
    pub ffn_dim_multiplier: Option<f64>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub max_seq_len: Option<usize>,
}

fn minus_one() -> i64 {
    -1
}
fn default_multiple_of() -> usize {
    256
}
fn default_norm_eps() -> f64 {
    1e-5
}

/// Llama 2's context length; Meta's `params.json` does not record it.
pub const LLAMA2_POSITIONS: usize = 4096;

impl MetaParams {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let params: Self = serde_json::from_str(&text).map_err(|e| LlamaError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if params.dim == 0 || params.n_layers == 0 || params.n_heads == 0 {
            return Err(LlamaError::Config {
                path: path.to_path_buf(),
                message: "`dim`, `n_layers` and `n_heads` must be positive".into(),
            });
        }
        Ok(params)
    }

    /// The feed-forward width as Meta's `FeedForward` computes it (`None` if it overflows).
    pub fn intermediate_size(&self) -> Option<usize> {
        feed_forward_width(self.dim, self.multiple_of, self.ffn_dim_multiplier)
    }

    /// Our config for these parameters (`vocab_size` when params.json says -1).
    pub fn to_config(&self, vocab_size: usize, max_positions: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size: self.dim,
            // An overflowing width becomes 0, which validation refuses.
            intermediate_size: self.intermediate_size().unwrap_or(0),
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: self.n_kv_heads.unwrap_or(self.n_heads),
            max_position_embeddings: self.max_seq_len.unwrap_or(max_positions),
            rms_norm_eps: self.norm_eps,
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            rope_scaling: None,
            tie_word_embeddings: false,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: None,
        }
    }

    /// params.json for `config`, or why Meta's format cannot hold it.
    pub fn from_config(config: &LlamaConfig) -> std::result::Result<serde_json::Value, String> {
        if config.rope_scaling.is_some() {
            return Err("Meta's format has no RoPE scaling".into());
        }
        let (multiple_of, multiplier) =
            ffn_parameters(config.hidden_size, config.intermediate_size).ok_or_else(|| {
                format!(
                    "no `multiple_of`/`ffn_dim_multiplier` gives intermediate_size {} for dim {}",
                    config.intermediate_size, config.hidden_size
                )
            })?;
        let mut params = serde_json::json!({
            "dim": config.hidden_size,
            "n_layers": config.num_hidden_layers,
            "n_heads": config.num_attention_heads,
            "vocab_size": config.vocab_size,
            "multiple_of": multiple_of,
            "norm_eps": config.rms_norm_eps,
        });
        if config.num_key_value_heads != config.num_attention_heads {
            params["n_kv_heads"] = config.num_key_value_heads.into();
        }
        if let Some(m) = multiplier {
            params["ffn_dim_multiplier"] = m.into();
        }
        // Llama 2's own code refuses keys it does not know; write theta only when it matters.
        if config.rope_theta != 10000.0 {
            params["rope_theta"] = config.rope_theta.into();
        }
        Ok(params)
    }
}

fn feed_forward_width(dim: usize, multiple_of: usize, multiplier: Option<f64>) -> Option<usize> {
    let mut hidden = 2.0 * dim.checked_mul(4)? as f64 / 3.0;
    if let Some(m) = multiplier {
        hidden = (m * hidden.trunc()).trunc();
    }
    if !(hidden.is_finite() && hidden >= 0.0 && hidden < (1u64 << 52) as f64) {
        return None;
    }
    let multiple_of = multiple_of.max(1);
    multiple_of.checked_mul((hidden as usize).div_ceil(multiple_of))
}

/// `multiple_of` and `ffn_dim_multiplier` that give `intermediate` for `dim`.
fn ffn_parameters(dim: usize, intermediate: usize) -> Option<(usize, Option<f64>)> {
    for multiple_of in [256, 128, 64, 32, 16, 8, 4, 2, 1] {
        if feed_forward_width(dim, multiple_of, None) == Some(intermediate) {
            return Some((multiple_of, None));
        }
    }
    let base = (2.0 * dim.checked_mul(4)? as f64 / 3.0) as usize;
    let multiplier = (intermediate as f64 + 0.5) / base.max(1) as f64;
    (feed_forward_width(dim, 1, Some(multiplier)) == Some(intermediate))
        .then_some((1, Some(multiplier)))
}

/// How the ranks hold a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    Rows,
    Columns,
    Whole,
}

/// One weight in both layouts.
struct Entry {
    meta: String,
    hf: String,
    split: Split,
    /// Heads whose rotary rows are permuted between the layouts (`wq`, `wk`).
    rotary_heads: Option<usize>,
    /// Full shape, `[rows, cols]` or `[len]`.
    shape: Vec<usize>,
}

fn entries(config: &LlamaConfig) -> Vec<Entry> {
    let d = config.hidden_size;
    let kv = config.kv_dim();
    let ff = config.intermediate_size;
    let e = |meta: String, hf: String, split, rotary_heads, shape: Vec<usize>| Entry {
        meta,
        hf,
        split,
        rotary_heads,
        shape,
    };
    let mut list = vec![e(
        "tok_embeddings.weight".into(),
        "model.embed_tokens.weight".into(),
        Split::Columns,
        None,
        vec![config.vocab_size, d],
    )];
    for i in 0..config.num_hidden_layers {
        let m = |s: &str| format!("layers.{i}.{s}.weight");
        let h = |s: &str| format!("model.layers.{i}.{s}.weight");
        list.extend([
            e(
                m("attention.wq"),
                h("self_attn.q_proj"),
                Split::Rows,
                Some(config.num_attention_heads),
                vec![d, d],
            ),
            e(
                m("attention.wk"),
                h("self_attn.k_proj"),
                Split::Rows,
                Some(config.num_key_value_heads),
                vec![kv, d],
            ),
            e(
                m("attention.wv"),
                h("self_attn.v_proj"),
                Split::Rows,
                None,
                vec![kv, d],
            ),
            e(
                m("attention.wo"),
                h("self_attn.o_proj"),
                Split::Columns,
                None,
                vec![d, d],
            ),
            e(
                m("feed_forward.w1"),
                h("mlp.gate_proj"),
                Split::Rows,
                None,
                vec![ff, d],
            ),
            e(
                m("feed_forward.w2"),
                h("mlp.down_proj"),
                Split::Columns,
                None,
                vec![d, ff],
            ),
            e(
                m("feed_forward.w3"),
                h("mlp.up_proj"),
                Split::Rows,
                None,
                vec![ff, d],
            ),
            e(
                m("attention_norm"),
                h("input_layernorm"),
                Split::Whole,
                None,
                vec![d],
            ),
            e(
                m("ffn_norm"),
                h("post_attention_layernorm"),
                Split::Whole,
                None,
                vec![d],
            ),
        ]);
    }
    list.push(e(
        "norm.weight".into(),
        "model.norm.weight".into(),
        Split::Whole,
        None,
        vec![d],
    ));
    list.push(e(
        "output.weight".into(),
        "lm_head.weight".into(),
        Split::Rows,
        None,
        vec![config.vocab_size, d],
    ));
    list
}

/// The shape one of `ranks` holds of a tensor of `full` shape.
fn rank_shape(full: &[usize], split: Split, ranks: usize) -> Vec<usize> {
    let mut shape = full.to_vec();
    match split {
        Split::Rows => shape[0] /= ranks,
        Split::Columns => shape[1] /= ranks,
        Split::Whole => {}
    }
    shape
}

/// Reorders the rows of each head: `to_hf` takes Meta's interleaved pairs to halves.
fn permute_rotary(data: &[u8], heads: usize, row_bytes: usize, to_hf: bool) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for head in 0..heads {
        for j in 0..half {
            for (pair, hf_row) in [(0, j), (1, j + half)] {
                let meta_row = head * head_dim + 2 * j + pair;
                let hf_row = head * head_dim + hf_row;
                let (from, to) = if to_hf {
                    (meta_row, hf_row)
                } else {
                    (hf_row, meta_row)
                };
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

fn storage_dtype(dtype: TorchDType) -> Option<SaveDtype> {
    match dtype {
        TorchDType::F32 => Some(SaveDtype::F32),
        TorchDType::F16 => Some(SaveDtype::F16),
        TorchDType::BF16 => Some(SaveDtype::BF16),
        _ => None,
    }
}

/// A Meta checkpoint directory, opened: its parameters and each rank's tensors (not yet read).
pub struct MetaCheckpoint {
    pub dir: PathBuf,
    pub params: MetaParams,
    pub config: LlamaConfig,
    pub dtype: SaveDtype,
    ranks: Vec<(PathBuf, HashMap<String, pytorch_reader::Tensor>)>,
}

impl MetaCheckpoint {
    /// Opens `dir` (params.json and consolidated.00.pth ... in order, none missing) and checks
    /// every rank holds every tensor at the shape its split gives.
    pub fn open(dir: &Path, max_positions: usize) -> Result<Self> {
        let params_path = dir.join("params.json");
        if !params_path.is_file() {
            return Err(LlamaError::Config {
                path: dir.to_path_buf(),
                message: "no params.json: not a Meta Llama checkpoint directory".into(),
            });
        }
        let params = MetaParams::read(&params_path)?;
        let shard_paths = shard_files(dir)?;
        let mut ranks = Vec::with_capacity(shard_paths.len());
        for path in shard_paths {
            let reader = PytorchReader::new(&path).map_err(|e| LlamaError::Config {
                path: path.clone(),
                message: format!("not a readable PyTorch state dict: {e}"),
            })?;
            let tensors = reader.into_tensors();
            if tensors.is_empty() {
                return Err(LlamaError::Config {
                    path: path.clone(),
                    message: "holds no tensors: not a state dict".into(),
                });
            }
            ranks.push((path, tensors));
        }
        let (first_path, first) = &ranks[0];
        // Before anything is sized by params.json: its layer count must be the files'.
        let weights = first.keys().filter(|n| n.as_str() != "rope.freqs").count();
        if params
            .n_layers
            .checked_mul(9)
            .and_then(|n| n.checked_add(3))
            != Some(weights)
        {
            return Err(LlamaError::Config {
                path: params_path.clone(),
                message: format!(
                    "`n_layers` {} does not match {}, which holds {weights} weights ({} layers \
                     and 3 others)",
                    params.n_layers,
                    first_path.display(),
                    weights.saturating_sub(3) as f64 / 9.0
                ),
            });
        }
        let embedding =
            first
                .get("tok_embeddings.weight")
                .ok_or_else(|| LlamaError::MissingTensor {
                    path: first_path.clone(),
                    name: "tok_embeddings.weight".into(),
                })?;
        let vocab = match params.vocab_size {
            v if v > 0 => v as usize,
            _ => embedding.shape().first().copied().unwrap_or(0),
        };
        let dtype = storage_dtype(embedding.dtype()).ok_or_else(|| LlamaError::Config {
            path: first_path.clone(),
            message: format!(
                "tensor `tok_embeddings.weight` is {:?}; expected float32, float16 or bfloat16",
                embedding.dtype()
            ),
        })?;
        let config = params.to_config(vocab, max_positions);
        config.validate(&params_path)?;
        let checkpoint = Self {
            dir: dir.to_path_buf(),
            params,
            config,
            dtype,
            ranks,
        };
        checkpoint.check_shapes()?;
        Ok(checkpoint)
    }

    pub fn model_parallel(&self) -> usize {
        self.ranks.len()
    }

    fn check_shapes(&self) -> Result<()> {
        let ranks = self.ranks.len();
        let described = format!(
            "for {ranks} model-parallel rank(s) of the model params.json describes (dim {}, \
             {} layers, {} heads, {} KV heads, vocab {})",
            self.config.hidden_size,
            self.config.num_hidden_layers,
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
            self.config.vocab_size
        );
        let list = entries(&self.config);
        let known: std::collections::HashSet<&str> = list.iter().map(|e| e.meta.as_str()).collect();
        for (path, tensors) in &self.ranks {
            // Meta's files carry the rotary frequencies they recompute anyway.
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            if let Some(name) = names
                .into_iter()
                .find(|n| !known.contains(n.as_str()) && n.as_str() != "rope.freqs")
            {
                return Err(LlamaError::Config {
                    path: path.clone(),
                    message: format!(
                        "unexpected tensor `{name}`: not a Llama 2 weight in Meta's layout \
                         (or params.json describes another model: {} layers)",
                        self.config.num_hidden_layers
                    ),
                });
            }
        }
        for entry in list {
            let expected = rank_shape(&entry.shape, entry.split, ranks);
            let divides = match entry.split {
                Split::Rows => entry.shape[0] % ranks == 0,
                Split::Columns => entry.shape[1] % ranks == 0,
                Split::Whole => true,
            };
            for (path, tensors) in &self.ranks {
                let tensor = tensors
                    .get(&entry.meta)
                    .ok_or_else(|| LlamaError::MissingTensor {
                        path: path.clone(),
                        name: entry.meta.clone(),
                    })?;
                if !divides || tensor.shape() != expected.as_slice() {
                    return Err(LlamaError::Config {
                        path: path.clone(),
                        message: format!(
                            "tensor `{}` has shape {:?}, expected {:?} {described}",
                            entry.meta,
                            tensor.shape(),
                            expected
                        ),
                    });
                }
                if storage_dtype(tensor.dtype()) != Some(self.dtype) {
                    return Err(LlamaError::Config {
                        path: path.clone(),
                        message: format!(
                            "tensor `{}` is {:?} where the others are {}",
                            entry.meta,
                            tensor.dtype(),
                            self.dtype.torch_name()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The whole tensor `entry` in Hugging Face's layout, as little-endian bytes.
    fn joined(&self, entry: &Entry) -> Result<Vec<u8>> {
        let element = self.dtype.size();
        let parts = self
            .ranks
            .iter()
            .map(|(path, tensors)| {
                // Presence was checked on open.
                let tensor = &tensors[&entry.meta];
                tensor.read().map_err(io_err(path))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut data = match entry.split {
            Split::Whole => parts.into_iter().next().unwrap_or_default(),
            Split::Rows => parts.concat(),
            Split::Columns => {
                let rows = entry.shape[0];
                let part_row = entry.shape[1] / self.ranks.len() * element;
                let mut out = Vec::with_capacity(rows * part_row * parts.len());
                for row in 0..rows {
                    for part in &parts {
                        out.extend_from_slice(&part[row * part_row..(row + 1) * part_row]);
                    }
                }
                out
            }
        };
        if let Some(heads) = entry.rotary_heads {
            data = permute_rotary(&data, heads, entry.shape[1] * element, true);
        }
        Ok(data)
    }
}

/// `consolidated.00.pth`, `consolidated.01.pth`, ... in rank order; a gap is an error.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut ranks = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(rank) = name
            .strip_prefix("consolidated.")
            .and_then(|rest| rest.strip_suffix(".pth"))
        {
            let rank: usize = rank.parse().map_err(|_| LlamaError::Config {
                path: entry.path(),
                message: "expected consolidated.NN.pth with NN a rank number".into(),
            })?;
            ranks.push((rank, entry.path()));
        }
    }
    ranks.sort();
    if ranks.is_empty() {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "no consolidated.NN.pth files".into(),
        });
    }
    for (expected, (rank, _)) in ranks.iter().enumerate() {
        if *rank != expected {
            return Err(LlamaError::Config {
                path: dir.join(format!("consolidated.{expected:02}.pth")),
                message: format!(
                    "missing: the ranks run to {} but this one is not there",
                    ranks.last().map_or(0, |r| r.0)
                ),
            });
        }
    }
    Ok(ranks.into_iter().map(|(_, path)| path).collect())
}

/// What [`convert_meta`] writes besides the weights.
pub struct ConvertOptions {
    pub max_shard_bytes: u64,
    pub overwrite: bool,
    /// Copied into the output (tokenizer.model).
    pub extra_files: Vec<PathBuf>,
    /// Written into the output (tokenizer.json, tokenizer_config.json, ...).
    pub extra_json: Vec<(String, serde_json::Value)>,
}

/// Writes `checkpoint` as a Hugging Face `LlamaForCausalLM` directory in its own dtype, one
/// tensor read at a time, atomically.
pub fn convert_meta(
    checkpoint: &MetaCheckpoint,
    out: &Path,
    options: &ConvertOptions,
) -> Result<()> {
    let list = entries(&checkpoint.config);
    let layout: Vec<(String, Vec<usize>)> = list
        .iter()
        .map(|e| (e.hf.clone(), e.shape.clone()))
        .collect();
    write_atomically(out, options.overwrite, |partial| {
        write_safetensors_shards(
            partial,
            &layout,
            checkpoint.dtype.safetensors(),
            options.max_shard_bytes,
            |i| checkpoint.joined(&list[i]),
        )?;
        let config = &checkpoint.config;
        write_json(
            &partial.join("config.json"),
            &config.to_hf_json("LlamaForCausalLM", checkpoint.dtype.torch_name()),
        )?;
        write_json(
            &partial.join("generation_config.json"),
            &serde_json::json!({
                "bos_token_id": config.bos_token_id,
                "eos_token_id": config.eos_token_id,
            }),
        )?;
        write_extras(partial, &options.extra_files, &options.extra_json)
    })
}

/// Writes `model` in Meta's layout: params.json and `model_parallel` consolidated shards in
/// `dtype`, plus `extra_files` (tokenizer.model), atomically.
pub fn export_meta(
    model: &Llama,
    config: &LlamaConfig,
    out: &Path,
    model_parallel: usize,
    dtype: SaveDtype,
    extra_files: &[PathBuf],
    overwrite: bool,
) -> Result<()> {
    let params = MetaParams::from_config(config).map_err(LlamaError::Invalid)?;
    if model.score.is_some() {
        return Err(LlamaError::Invalid(
            "a reward or value model has no place in Meta's layout (it has no scalar head)".into(),
        ));
    }
    if model_parallel == 0 {
        return Err(LlamaError::Invalid(
            "the model-parallel size must be at least 1".into(),
        ));
    }
    let mut list = entries(config);
    if config.tie_word_embeddings {
        // Meta's layout always has its own `output.weight`: the tied embedding, copied.
        if let Some(output) = list.iter_mut().find(|e| e.meta == "output.weight") {
            output.hf = "model.embed_tokens.weight".into();
        }
    }
    for entry in &list {
        let (size, what) = match entry.split {
            Split::Rows => (entry.shape[0], "rows"),
            Split::Columns => (entry.shape[1], "columns"),
            Split::Whole => continue,
        };
        let heads_split = entry
            .rotary_heads
            .is_none_or(|heads| heads % model_parallel == 0);
        if size % model_parallel != 0 || !heads_split {
            return Err(LlamaError::Invalid(format!(
                "model-parallel size {model_parallel} does not divide the {size} {what} of \
                 `{}`{}",
                entry.meta,
                entry
                    .rotary_heads
                    .map(|h| format!(" ({h} heads)"))
                    .unwrap_or_default()
            )));
        }
    }
    let params_by_name: HashMap<String, _> = hf_params(model).into_iter().collect();
    for entry in &list {
        if !params_by_name.contains_key(&entry.hf) {
            return Err(LlamaError::Invalid(format!(
                "the model has no `{}`",
                entry.hf
            )));
        }
    }
    let element = dtype.size();
    // Rank `rank`'s slice of `entry`, in Meta's row order; one tensor in memory at a time.
    let slice = |entry: &Entry, rank: usize| -> Vec<u8> {
        let mut data = dtype.encode(&params_by_name[&entry.hf].to_host());
        if let Some(heads) = entry.rotary_heads {
            data = permute_rotary(&data, heads, entry.shape[1] * element, false);
        }
        match entry.split {
            Split::Whole => data,
            Split::Rows => {
                let len = data.len() / model_parallel;
                data[rank * len..(rank + 1) * len].to_vec()
            }
            Split::Columns => {
                let row = entry.shape[1] * element;
                let part = row / model_parallel;
                let mut out = Vec::with_capacity(data.len() / model_parallel);
                for r in 0..entry.shape[0] {
                    let start = r * row + rank * part;
                    out.extend_from_slice(&data[start..start + part]);
                }
                out
            }
        }
    };
    write_atomically(out, overwrite, |partial| {
        for rank in 0..model_parallel {
            let layout: Vec<(String, Vec<usize>)> = list
                .iter()
                .map(|e| {
                    (
                        e.meta.clone(),
                        rank_shape(&e.shape, e.split, model_parallel),
                    )
                })
                .collect();
            let path = partial.join(format!("consolidated.{rank:02}.pth"));
            write_state_dict(&path, &layout, dtype, |i| Ok(slice(&list[i], rank)))?;
        }
        write_json(&partial.join("params.json"), &params)?;
        write_extras(partial, extra_files, &[])
    })
}

/// Writes a state dict as `torch.save` does (a ZIP archive of `data.pkl`, one storage per
/// tensor and `version`), readable by `torch.load(weights_only=True)`. `layout` names each
/// tensor and its shape; `bytes(i)` gives its little-endian data, one tensor at a time.
pub fn write_state_dict(
    path: &Path,
    layout: &[(String, Vec<usize>)],
    dtype: SaveDtype,
    mut bytes: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let zip_err = |e: zip::result::ZipError| LlamaError::Config {
        path: path.to_path_buf(),
        message: format!("writing the archive: {e}"),
    };
    // Stored, 64-byte aligned entries, as torch writes them (so `mmap=True` loads work too).
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true)
        .with_alignment(64);
    let prefix = path
        .file_stem()
        .map(|s| s.to_string_lossy().replace('.', "_"))
        .unwrap_or_else(|| "archive".into());
    zip.start_file(format!("{prefix}/data.pkl"), options)
        .map_err(zip_err)?;
    zip.write_all(&state_dict_pickle(layout, dtype))
        .map_err(io_err(path))?;
    zip.start_file(format!("{prefix}/byteorder"), options)
        .map_err(zip_err)?;
    zip.write_all(b"little").map_err(io_err(path))?;
    for (key, (name, shape)) in layout.iter().enumerate() {
        let data = bytes(key)?;
        if data.len() != shape.iter().product::<usize>() * dtype.size() {
            return Err(LlamaError::Invalid(format!(
                "{}: tensor `{name}` has {} bytes for shape {shape:?}",
                path.display(),
                data.len()
            )));
        }
        zip.start_file(format!("{prefix}/data/{key}"), options)
            .map_err(zip_err)?;
        zip.write_all(&data).map_err(io_err(path))?;
    }
    zip.start_file(format!("{prefix}/version"), options)
        .map_err(zip_err)?;
    zip.write_all(b"3\n").map_err(io_err(path))?;
    let writer = zip.finish().map_err(zip_err)?;
    let file = writer.into_inner().map_err(|e| LlamaError::Io {
        path: path.to_path_buf(),
        error: e.into_error(),
    })?;
    let _ = file.sync_all();
    Ok(())
}

/// Pickle (protocol 2) of a dict of tensors, each `torch._utils._rebuild_tensor_v2` of its
/// own storage (key = its index), contiguous, on the CPU.
fn state_dict_pickle(layout: &[(String, Vec<usize>)], dtype: SaveDtype) -> Vec<u8> {
    let storage = match dtype {
        SaveDtype::F32 => "FloatStorage",
        SaveDtype::F16 => "HalfStorage",
        SaveDtype::BF16 => "BFloat16Storage",
    };
    let mut p = Pickle(vec![0x80, 2]);
    p.op(b'}'); // EMPTY_DICT
    p.op(b'('); // MARK
    for (key, (name, shape)) in layout.iter().enumerate() {
        p.string(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // The storage, as a persistent id: ('storage', type, key, location, numel).
        p.op(b'(');
        p.string("storage");
        p.global("torch", storage);
        p.string(&key.to_string());
        p.string("cpu");
        p.int(shape.iter().product::<usize>() as u64);
        p.op(b't'); // TUPLE
        p.op(b'Q'); // BINPERSID
        p.int(0); // storage offset
        p.ints(shape);
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        p.ints(&stride);
        p.op(0x89); // NEWFALSE: requires_grad
        p.global("collections", "OrderedDict");
        p.op(b')'); // EMPTY_TUPLE
        p.op(b'R'); // REDUCE: backward hooks
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u'); // SETITEMS
    p.op(b'.'); // STOP
    p.0
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, code: u8) {
        self.0.push(code);
    }

    fn string(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn int(&mut self, v: u64) {
        if v < (1 << 31) {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.0.push(0x8a); // LONG1, little-endian two's complement
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] >= 0x80 {
                bytes.push(0);
            }
            self.0.push(bytes.len() as u8);
            self.0.extend_from_slice(&bytes);
        }
    }

    fn ints(&mut self, values: &[usize]) {
        self.op(b'(');
        for &v in values {
            self.int(v as u64);
        }
        self.op(b't');
    }
}
