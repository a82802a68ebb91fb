//! Hugging Face parameter names: building a model from named tensors (a checkpoint, or random
//! init) and listing its parameters by name (export, optimizer state). Only the checkpoint code
//! uses these; the decoder itself knows no file names.

use std::collections::HashMap;

use burn::module::{Param, ParamId};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::LlamaConfig;
use crate::model::{to_host, Attention, DecoderLayer, Head, Llama, Mlp};

/// Supplies a named tensor of the requested shape as host f32 data.
pub type WeightSource<'a> = dyn FnMut(&str, &[usize]) -> crate::error::Result<Vec<f32>> + 'a;

/// Builds a model whose every tensor comes from `source` (a checkpoint, or random init),
/// named as in Hugging Face checkpoints. Linear weights are given in PyTorch's
/// `[out, in]` layout; `source` returns host data and the shape it was asked for.
///
/// `ids` gives parameters fixed ids by name (a resumed run needs the ids its optimizer state was
/// saved under); other parameters get fresh ids.
pub fn build_llama(
    config: &LlamaConfig,
    device: &Device,
    head: Head,
    source: &mut WeightSource<'_>,
    ids: Option<&HashMap<String, u64>>,
) -> crate::error::Result<Llama> {
    let param = |name: &str, tensor: Tensor<2>| with_id(Param::from_tensor(tensor), name, ids);
    let d = config.hidden_size;
    let kv = config.kv_dim();
    let ff = config.intermediate_size;
    let vocab = config.vocab_size;

    let mut linear = |name: &str, d_in: usize, d_out: usize| -> crate::error::Result<Linear> {
        let data = source(name, &[d_out, d_in])?;
        Ok(Linear {
            weight: param(
                name,
                Tensor::from_data(
                    TensorData::new(transpose(&data, d_out, d_in), [d_in, d_out]),
                    device,
                ),
            ),
            bias: None,
        })
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let self_attn = Attention {
            q_proj: linear(&format!("{p}.self_attn.q_proj.weight"), d, d)?,
            k_proj: linear(&format!("{p}.self_attn.k_proj.weight"), d, kv)?,
            v_proj: linear(&format!("{p}.self_attn.v_proj.weight"), d, kv)?,
            o_proj: linear(&format!("{p}.self_attn.o_proj.weight"), d, d)?,
            n_heads: config.num_attention_heads,
            n_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim(),
        };
        let mlp = Mlp {
            gate_proj: linear(&format!("{p}.mlp.gate_proj.weight"), d, ff)?,
            up_proj: linear(&format!("{p}.mlp.up_proj.weight"), d, ff)?,
            down_proj: linear(&format!("{p}.mlp.down_proj.weight"), ff, d)?,
        };
        layers.push((p, self_attn, mlp));
    }
    let (lm_head, score) = match head {
        Head::Lm if config.tie_word_embeddings => (None, None),
        Head::Lm => (Some(linear("lm_head.weight", d, vocab)?), None),
        Head::Score => (None, Some(linear("score.weight", d, 1)?)),
    };

    let mut norm = |name: &str| -> crate::error::Result<RmsNorm> {
        let data = source(name, &[d])?;
        Ok(RmsNorm {
            gamma: with_id(
                Param::from_tensor(Tensor::from_data(TensorData::new(data, [d]), device)),
                name,
                ids,
            ),
            epsilon: config.rms_norm_eps,
        })
    };
    let mut decoder = Vec::with_capacity(layers.len());
    for (p, self_attn, mlp) in layers {
        decoder.push(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    let final_norm = norm("model.norm.weight")?;

    let embed = source("model.embed_tokens.weight", &[vocab, d])?;
    Ok(Llama {
        embed_tokens: Embedding {
            weight: param(
                "model.embed_tokens.weight",
                Tensor::from_data(TensorData::new(embed, [vocab, d]), device),
            ),
        },
        layers: decoder,
        norm: final_norm,
        lm_head,
        score,
        rope: crate::model::Rope::of(config),
        compute_dtype: None,
        adapter_dropout: None,
    })
}

/// Gives a parameter the id saved for its name, if any.
fn with_id<const D: usize>(
    mut param: Param<Tensor<D>>,
    name: &str,
    ids: Option<&HashMap<String, u64>>,
) -> Param<Tensor<D>> {
    if let Some(&id) = ids.and_then(|m| m.get(name)) {
        param.id = ParamId::from(id);
    }
    param
}

/// Row-major `[rows, cols]` to `[cols, rows]`.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// A parameter of the model seen through its Hugging Face name: export reads them one at a time
/// so a large model is never copied to the host whole.
pub enum ParamRef<'a> {
    Linear(&'a Linear),
    Norm(&'a RmsNorm),
    Embedding(&'a Embedding),
}

impl ParamRef<'_> {
    /// Shape in PyTorch layout (`[out, in]` for linear weights).
    pub fn hf_shape(&self) -> Vec<usize> {
        match self {
            ParamRef::Linear(l) => {
                let [d_in, d_out] = l.weight.dims();
                vec![d_out, d_in]
            }
            ParamRef::Norm(n) => n.gamma.dims().to_vec(),
            ParamRef::Embedding(e) => e.weight.dims().to_vec(),
        }
    }

    /// The values in PyTorch layout, as f32 on the host.
    pub fn to_host(&self) -> Vec<f32> {
        match self {
            ParamRef::Linear(l) => {
                let [d_in, d_out] = l.weight.dims();
                transpose(&to_host(l.weight.val()), d_in, d_out)
            }
            ParamRef::Norm(n) => to_host(n.gamma.val()),
            ParamRef::Embedding(e) => to_host(e.weight.val()),
        }
    }
}

/// Every parameter with its Hugging Face name, in checkpoint order; the inverse of
/// [`build_llama`].
pub fn hf_params(model: &Llama) -> Vec<(String, ParamRef<'_>)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        ParamRef::Embedding(&model.embed_tokens),
    )];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &layer.self_attn;
        for (name, linear) in [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &layer.mlp.gate_proj),
            ("mlp.up_proj", &layer.mlp.up_proj),
            ("mlp.down_proj", &layer.mlp.down_proj),
        ] {
            out.push((format!("{p}.{name}.weight"), ParamRef::Linear(linear)));
        }
        out.push((
            format!("{p}.input_layernorm.weight"),
            ParamRef::Norm(&layer.input_layernorm),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            ParamRef::Norm(&layer.post_attention_layernorm),
        ));
    }
    out.push(("model.norm.weight".to_string(), ParamRef::Norm(&model.norm)));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), ParamRef::Linear(head)));
    }
    if let Some(score) = &model.score {
        out.push(("score.weight".to_string(), ParamRef::Linear(score)));
    }
    out
}

/// Every parameter's id by Hugging Face name (LoRA factors included), to save beside optimizer
/// state.
pub fn param_ids(model: &Llama) -> HashMap<String, u64> {
    let mut ids: HashMap<String, u64> = hf_params(model)
        .into_iter()
        .map(|(name, p)| {
            let id = match p {
                ParamRef::Linear(l) => l.weight.id,
                ParamRef::Norm(n) => n.gamma.id,
                ParamRef::Embedding(e) => e.weight.id,
            };
            (name, id.val())
        })
        .collect();
    ids.extend(crate::lora::adapter_ids(model));
    ids
}
