//! The Llama 2 decoder in one file: embeddings, pre-RMSNorm blocks with rotary grouped-query
//! attention and a SwiGLU MLP, the final norm and the language-model head.
//!
//! Tensors are laid out `[batch, time, ...]`. Attention takes an explicit position per token and
//! a key mask, so left padding, right padding and a KV cache all go through the same code.

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, TensorData};

use crate::config::{LlamaConfig, RopeScaling};

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens` (or the model has a scalar head).
    pub lm_head: Option<Linear>,
    /// The scalar head of a reward or value model (`score.weight` in Hugging Face's
    /// `LlamaForSequenceClassification`); such a model has no language-model head.
    pub score: Option<Linear>,
    /// Rotary settings: base, scaling and the length dynamic scaling starts from.
    #[module(skip)]
    pub rope: Rope,
    /// The dtype activations are computed in when it differs from the weights' (bf16 compute
    /// over f32 master weights, as mixed precision does); `None`: the weights' own dtype.
    #[module(skip)]
    pub compute_dtype: Option<FloatDType>,
    /// Dropout on the input of every LoRA adapter, set on the copy of the model a training
    /// pass runs (`None`: no dropout, as in every other pass).
    #[module(skip)]
    pub adapter_dropout: Option<AdapterDropout>,
}

/// LoRA dropout for one training pass: each adapter sees its input with elements dropped with
/// probability `prob` (and the rest scaled by `1 / (1 - prob)`), as PEFT's `lora_dropout`;
/// the frozen weight sees the whole input. The masks are drawn from `seed` and the weight's id,
/// so a layer recomputed in the backward pass draws the same ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterDropout {
    pub prob: f64,
    pub seed: u64,
}

/// What the rotary tables are computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    /// `max_position_embeddings`: dynamic scaling changes nothing up to this length.
    pub max_positions: usize,
}

impl Rope {
    pub fn of(config: &LlamaConfig) -> Self {
        Self {
            theta: config.rope_theta,
            scaling: config.rope_scaling,
            max_positions: config.max_position_embeddings,
        }
    }
}

/// Which head sits on the decoder's final hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Next-token logits (`LlamaForCausalLM`): `lm_head.weight`, or tied to the embeddings.
    Lm,
    /// One number per position (`LlamaForSequenceClassification`, `num_labels = 1`):
    /// `score.weight`, shape `[1, hidden]`.
    Score,
}

/// What the layers of one pass without a KV cache share ([`Llama::layer_inputs`]).
#[derive(Debug, Clone)]
pub struct LayerInputs {
    rope: (Tensor<4>, Tensor<4>),
    mask: Tensor<4, Bool>,
    dropout: Option<AdapterDropout>,
}

/// Keys and values of the tokens seen so far, one entry per layer, each `[batch, kv_heads,
/// time, head_dim]`, plus the key mask they were computed under.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// `[batch][time]`: whether each cached slot holds a real token.
    key_valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.key_valid.first().map_or(0, |row| row.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where [`StepInput::padded`] puts the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

/// One forward step's input: token ids, their positions (for RoPE) and which slots are real.
/// All are `[batch][time]`; `valid[b][t] == false` marks padding.
#[derive(Debug, Clone)]
pub struct StepInput {
    pub tokens: Vec<Vec<u32>>,
    pub positions: Vec<Vec<usize>>,
    pub valid: Vec<Vec<bool>>,
    /// Packed sequences: the example each slot belongs to. A token attends only to earlier
    /// tokens of its own example, as if it were alone. `None`: one example per row.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl StepInput {
    /// Positions count real tokens only, so a left-padded row starts at position 0 exactly
    /// where its text starts, as `transformers` does in `generate`. `start[b]` is the position
    /// of the first real token in this step (0 without a cache).
    pub fn from_padded(tokens: Vec<Vec<u32>>, valid: Vec<Vec<bool>>, start: &[usize]) -> Self {
        let positions = valid
            .iter()
            .zip(start)
            .map(|(row, &first)| {
                let mut next = first;
                row.iter()
                    .map(|&real| {
                        let pos = next;
                        if real {
                            next += 1;
                        }
                        pos
                    })
                    .collect()
            })
            .collect();
        Self {
            tokens,
            positions,
            valid,
            segments: None,
        }
    }

    /// Rows of different lengths padded with `pad` to the longest, at the end
    /// ([`Side::Right`]: training, scoring) or at the start ([`Side::Left`]: generation, so
    /// every row's next token comes at the same slot). The one place batches are padded for
    /// the model; positions count real tokens from 0.
    pub fn padded<R: AsRef<[u32]>>(rows: &[R], pad: u32, side: Side) -> Self {
        let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows.len());
        let mut valid = Vec::with_capacity(rows.len());
        for row in rows {
            let row = row.as_ref();
            let fill = width - row.len();
            let (mut ids, mut mask) = (Vec::with_capacity(width), Vec::with_capacity(width));
            if side == Side::Left {
                ids.extend(std::iter::repeat_n(pad, fill));
                mask.extend(std::iter::repeat_n(false, fill));
            }
            ids.extend_from_slice(row);
            mask.extend(std::iter::repeat_n(true, row.len()));
            ids.resize(width, pad);
            mask.resize(width, false);
            tokens.push(ids);
            valid.push(mask);
        }
        Self::from_padded(tokens, valid, &vec![0; rows.len()])
    }

    fn dims(&self) -> (usize, usize) {
        (
            self.tokens.len(),
            self.tokens.first().map_or(0, |r| r.len()),
        )
    }
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<4>, Tensor<4>),
        mask: Tensor<4, Bool>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        dropout: Option<AdapterDropout>,
    ) -> Tensor<3> {
        let [batch, time, _] = x.dims();
        let (heads, kv_heads, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = project(&self.q_proj, x.clone(), dropout)
            .reshape([batch, time, heads, hd])
            .swap_dims(1, 2);
        let k = project(&self.k_proj, x.clone(), dropout)
            .reshape([batch, time, kv_heads, hd])
            .swap_dims(1, 2);
        let v = project(&self.v_proj, x, dropout)
            .reshape([batch, time, kv_heads, hd])
            .swap_dims(1, 2);
        let q = apply_rope(q, rope);
        let k = apply_rope(k, rope);

        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((past_k, past_v)) => (
                        Tensor::cat(vec![past_k, k], 2),
                        Tensor::cat(vec![past_v, v], 2),
                    ),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };

        // Grouped-query K/V heads are repeated for the attention kernels.
        let group = heads / kv_heads;
        let (k, v) = if group > 1 {
            (repeat_kv(k, group), repeat_kv(v, group))
        } else {
            (k, v)
        };
        // Scores and softmax in f32 whatever the compute dtype, as transformers does.
        let dtype = q.dtype();
        let (q, k, v) = if dtype == DType::F32 {
            (q, k, v)
        } else {
            (q.cast(DType::F32), k.cast(DType::F32), v.cast(DType::F32))
        };
        let out = attend(q, k, v, mask, 1.0 / (hd as f64).sqrt())
            .cast(dtype)
            .swap_dims(1, 2)
            .reshape([batch, time, heads * hd]);
        project(&self.o_proj, out, dropout)
    }
}

/// Scaled dot-product attention of `[b, h, t, hd]` queries over keys and values, with `mask`
/// true where a query may not look (except on libtorch without autodiff, where burn-tch hands
/// the mask to `scaled_dot_product_attention` unchanged and true means the opposite: see
/// `sdpa_mask_means_attend`). Every query should keep a key: a row with all keys masked is
/// zeros on flex and NaN elsewhere.
///
/// Without autodiff this is burn's attention, which backends run fused (flex: tiled kernels;
/// libtorch: `scaled_dot_product_attention`). With autodiff, burn 0.22 records an unfused
/// fallback: some twenty passes over the `[b, h, t, t]` scores, forward and backward, each on
/// one core on flex (a quarter of an SFT step). Here the softmax `P` runs outside the graph
/// (flex: one fused, parallel kernel), and the graph holds the scores' product, `O = P·V`, and
/// a term of value zero whose gradient is the softmax's: with `A = P∘S` and
/// `B = A·V - rowsum(A)∘O` (`V`, `O` constant), `B - detach(B)` sends
/// `dS = P∘(dO·Vᵀ - rowsum(dO∘O))` to the scores, the softmax backward written as flash
/// attention writes it.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4, Bool>,
    scale: f64,
) -> Tensor<4> {
    if !q.is_autodiff() {
        let options = AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: false,
        };
        return attention(q, k, v, Some(mask), None, options);
    }
    let scores = (q * scale).matmul(k.swap_dims(2, 3));
    let [batch, _, queries, keys] = scores.dims();
    let shared_mask = mask.dims() == [batch, 1, queries, keys];
    let probs = if shared_mask && crate::host::serves(&scores.device()) {
        crate::host::masked_softmax(scores.clone().inner(), mask.inner())
    } else {
        let masked = scores
            .clone()
            .inner()
            .mask_fill(mask.inner(), f32::NEG_INFINITY);
        softmax(masked, 3)
    };
    let out = Tensor::from_inner(probs.clone()).matmul(v.clone());
    let weighted = Tensor::from_inner(probs) * scores;
    let tangent = weighted.clone().matmul(v.detach()) - weighted.sum_dim(3) * out.clone().detach();
    out + (tangent.clone() - tangent.detach())
}

/// `[b, kv_heads, t, hd]` with each head repeated `group` times in place, `[b, heads, t, hd]`,
/// as the query heads that share it expect.
fn repeat_kv(x: Tensor<4>, group: usize) -> Tensor<4> {
    let [b, kv, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, group, t, hd])
        .reshape([b, kv * group, t, hd])
}

/// Rotary embedding in the "rotate half" layout that Hugging Face checkpoints use:
/// x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a].
fn apply_rope(x: Tensor<4>, (cos, sin): &(Tensor<4>, Tensor<4>)) -> Tensor<4> {
    let [b, h, t, hd] = x.dims();
    // The tables are f32; they meet bf16 activations at bf16, as transformers casts them.
    let (cos, sin) = if cos.dtype() == x.dtype() {
        (cos.clone(), sin.clone())
    } else {
        (cos.clone().cast(x.dtype()), sin.clone().cast(x.dtype()))
    };
    let half = hd / 2;
    let first = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let second = x.clone().slice([0..b, 0..h, 0..t, half..hd]);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos + rotated * sin
}

/// `model` with every float parameter (adapter factors included) stored as `dtype`, ids and
/// trainability kept; packed (quantised) weights are left as they are. Pure bf16 training keeps
/// weights, gradients and AdamW moments in bf16 this way.
pub fn cast_weights(model: Llama, dtype: FloatDType) -> Llama {
    model.map(&mut CastFloats {
        dtype,
        frozen_only: false,
    })
}

/// [`cast_weights`] for the frozen parameters only: a LoRA model's base goes to bf16 while its
/// adapter factors (and a scalar head) train in f32, as PEFT keeps them.
pub fn cast_frozen_weights(model: Llama, dtype: FloatDType) -> Llama {
    model.map(&mut CastFloats {
        dtype,
        frozen_only: true,
    })
}

struct CastFloats {
    dtype: FloatDType,
    frozen_only: bool,
}

impl ModuleMapper for CastFloats {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (dtype, frozen_only) = (self.dtype, self.frozen_only);
        param.map(|tensor| {
            let skip = frozen_only && tensor.is_require_grad();
            if skip || !tensor.dtype().is_float() || tensor.dtype() == DType::from(dtype) {
                return tensor;
            }
            // A leaf again, so the cast is not part of any graph.
            let trained = tensor.is_require_grad();
            tensor.cast(dtype).detach().set_require_grad(trained)
        })
    }
}

/// `x @ W` with the weight at the activations' dtype (a no-op unless they differ: f32 master
/// weights under bf16 compute).
/// With `dropout` and an adapter on the weight, the adapter sees `x` with elements dropped:
/// burn composes the adapter into the weight, so the product with the whole `x` is corrected
/// by `scale * (dropped(x) - x) @ a @ b`.
fn project<const D: usize>(
    linear: &Linear,
    x: Tensor<D>,
    dropout: Option<AdapterDropout>,
) -> Tensor<D> {
    let weight = linear.weight.val();
    let [d_in, d_out] = weight.dims();
    let mut shape = x.dims();
    let rows: usize = shape[..D - 1].iter().product();
    shape[D - 1] = d_out;
    let flat = x.reshape([rows, d_in]);
    let dtype = flat.dtype();
    // A packed (quantised) weight is dequantised by the product itself, to the activations'
    // dtype; only a float weight of another dtype is cast.
    let mut out = flat
        .clone()
        .matmul(if weight.dtype() == dtype || !weight.dtype().is_float() {
            weight
        } else {
            weight.cast(dtype)
        });
    if let (Some(dropout), Some(adapter)) = (dropout, linear.weight.adapter()) {
        if dropout.prob > 0.0 {
            let device = flat.device();
            // A stream of its own per weight and pass, the same whenever the pass is recomputed.
            device.seed(dropout.seed ^ linear.weight.id.val().wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let keep = 1.0 - dropout.prob;
            let kept = flat.random_like(burn::tensor::Distribution::Bernoulli(keep));
            let change = flat.clone() * kept.div_scalar(keep) - flat;
            let (a, b) = (adapter.a.val().cast(dtype), adapter.b.val().cast(dtype));
            out = out + change.matmul(a).matmul(b).mul_scalar(adapter.scale);
        }
    }
    out.reshape(shape)
}

/// RMSNorm: statistics in f32 (burn's RmsNorm computes them so), the weight at the
/// activations' dtype.
fn norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let gamma = norm.gamma.val();
    if gamma.dtype() == x.dtype() {
        return norm.forward(x);
    }
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + norm.epsilon).sqrt();
    (x / rms.cast(dtype)) * gamma.cast(dtype).unsqueeze()
}

impl Mlp {
    fn forward(&self, x: Tensor<3>, dropout: Option<AdapterDropout>) -> Tensor<3> {
        let gate = silu(project(&self.gate_proj, x.clone(), dropout));
        project(
            &self.down_proj,
            gate * project(&self.up_proj, x, dropout),
            dropout,
        )
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<4>, Tensor<4>),
        mask: Tensor<4, Bool>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        dropout: Option<AdapterDropout>,
    ) -> Tensor<3> {
        let input = norm(&self.input_layernorm, x.clone());
        let h = x + self.self_attn.forward(input, rope, mask, cache, dropout);
        h.clone()
            + self
                .mlp
                .forward(norm(&self.post_attention_layernorm, h), dropout)
    }
}

impl Llama {
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.dims()[0]
    }

    pub fn hidden_size(&self) -> usize {
        self.embed_tokens.weight.dims()[1]
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.weight.device()
    }

    /// The final-normed hidden states `[batch, time, hidden]`; the LM head and the scalar
    /// value/reward heads both read from here.
    /// The token embeddings of `input`, at the compute dtype: the first layer's input.
    pub fn embed(&self, input: &StepInput) -> Tensor<3> {
        let (batch, time) = input.dims();
        let flat_tokens: Vec<i64> = input.tokens.iter().flatten().map(|&t| t as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(flat_tokens, [batch, time]),
            &self.device(),
        );
        let x = self.embed_tokens.forward(tokens);
        match self.compute_dtype {
            Some(dtype) => x.cast(dtype),
            None => x,
        }
    }

    /// What every layer of a pass over `input` without a KV cache shares: the rotary tables and
    /// the attention mask.
    pub fn layer_inputs(&self, input: &StepInput) -> LayerInputs {
        let device = self.device();
        let (_, time) = input.dims();
        let head_dim = self.layers[0].self_attn.head_dim;
        LayerInputs {
            rope: rope_tables(&input.positions, head_dim, &self.rope, &device),
            mask: attention_mask(&input.valid, input.segments.as_deref(), time, &device),
            dropout: self.adapter_dropout,
        }
    }

    /// Decoder layer `index` on `x` (`[batch, time, hidden]`).
    pub fn layer(&self, index: usize, x: Tensor<3>, shared: &LayerInputs) -> Tensor<3> {
        self.layers[index].forward(x, &shared.rope, shared.mask.clone(), None, shared.dropout)
    }

    /// The final RMSNorm, after the last layer.
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        norm(&self.norm, x)
    }

    pub fn hidden_states(&self, input: &StepInput, cache: Option<&mut KvCache>) -> Tensor<3> {
        let device = self.device();
        let (batch, time) = input.dims();
        let mut x = self.embed(input);
        match cache {
            Some(cache) => {
                if cache.layers.len() != self.layers.len() {
                    cache.layers = vec![None; self.layers.len()];
                    cache.key_valid = vec![Vec::new(); batch];
                }
                for (row, valid) in cache.key_valid.iter_mut().zip(&input.valid) {
                    row.extend_from_slice(valid);
                }
                let head_dim = self.layers[0].self_attn.head_dim;
                let rope = rope_tables(&input.positions, head_dim, &self.rope, &device);
                let mask = attention_mask(&cache.key_valid, None, time, &device);
                for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    x = layer.forward(x, &rope, mask.clone(), Some(slot), None);
                }
            }
            None => {
                let shared = self.layer_inputs(input);
                for index in 0..self.layers.len() {
                    x = self.layer(index, x, &shared);
                }
            }
        }
        self.final_norm(x)
    }

    pub fn head(&self) -> Head {
        if self.score.is_some() {
            Head::Score
        } else {
            Head::Lm
        }
    }

    /// The scalar head at every position, `[batch, time]`: a reward model's score or a value
    /// model's estimate. Panics on a language model (callers check [`Llama::head`]).
    pub fn scalar_outputs(&self, hidden: Tensor<3>) -> Tensor<2> {
        let head = self
            .score
            .as_ref()
            .expect("scalar_outputs needs a model with a scalar head");
        let [b, t, _] = hidden.dims();
        // Scores and values leave the model as f32, whatever it computes in.
        project(head, hidden, None).reshape([b, t]).cast(DType::F32)
    }

    /// A reward model's score of each sequence `[batch]`, read at the row's last real token
    /// (never at padding, whichever side the rows are padded on).
    pub fn last_token_scores(&self, input: &StepInput) -> Tensor<1> {
        self.last_token_scores_of(self.hidden_states(input, None), input)
    }

    /// [`Llama::last_token_scores`] from the final hidden states of `input`.
    pub fn last_token_scores_of(&self, hidden: Tensor<3>, input: &StepInput) -> Tensor<1> {
        let rows = input.tokens.len();
        let last: Vec<i64> = input
            .valid
            .iter()
            .map(|row| row.iter().rposition(|&v| v).unwrap_or(0) as i64)
            .collect();
        let dim = hidden.dims()[2];
        // The head reads only the states it scores.
        let index =
            Tensor::<3, Int>::from_data(TensorData::new(last, [rows, 1, 1]), &self.device())
                .expand([rows, 1, dim]);
        self.scalar_outputs(hidden.gather(1, index)).reshape([rows])
    }

    /// Next-token logits `[batch, time, vocab]` for the given hidden states.
    pub fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        assert!(
            self.score.is_none(),
            "a model with a scalar head has no next-token logits"
        );
        match &self.lm_head {
            Some(head) => project(head, hidden, None),
            None => {
                let [b, t, d] = hidden.dims();
                let weight = self.embed_tokens.weight.val().cast(hidden.dtype());
                hidden
                    .reshape([b * t, d])
                    .matmul(weight.transpose())
                    .reshape([b, t, self.vocab_size()])
            }
        }
    }

    /// The log-probability of each target id under `softmax(logits / temperature)` over the
    /// first `vocab_limit` ids, from the final hidden states `[rows, time, hidden]`: the value
    /// and gradients of [`token_log_probs`] on [`Llama::lm_logits`], `[rows, time]`. `targets`
    /// holds `rows * time` ids in row order, each below the limit.
    ///
    /// The `[rows * time, vocab]` logits exist only outside the autodiff graph: the softmax and
    /// the log-sum-exp run there (one fused kernel, parallel on flex, where the element-wise
    /// chain of a log-softmax runs on one core), and the gradient enters through
    /// `-h · ((p - onehot(target)) W) / temperature`, whose derivative is the log-softmax's (`W`
    /// the head, `p` the softmax, a constant) and whose value is subtracted again. `p - onehot`
    /// is formed before the product, as the logits' backward pass forms it, so a confident
    /// prediction (`p` near 1 at the target) loses no precision to cancellation. Its products
    /// are the two matrix multiplies the logits' backward pass would take.
    pub fn target_log_probs(
        &self,
        hidden: Tensor<3>,
        targets: Vec<i64>,
        temperature: f64,
        vocab_limit: usize,
    ) -> Tensor<2> {
        let [rows, time, dim] = hidden.dims();
        let Some(weight) = self.head_rows(hidden.dtype()) else {
            return token_log_probs(self.lm_logits(hidden), targets, temperature, vocab_limit).0;
        };
        let [vocab, _] = weight.dims();
        let limit = vocab.min(vocab_limit.max(1));
        let weight = if limit < vocab {
            weight.slice([0..limit, 0..dim])
        } else {
            weight
        };
        let n = rows * time;
        let device = hidden.device();
        let hidden = hidden.reshape([n, dim]);
        let tracked = hidden.is_autodiff();

        // Outside the graph: the logits, their softmax and log-sum-exp, the targets' values,
        // and (for the gradient) softmax minus the targets' one-hot.
        let mut logits = hidden
            .clone()
            .inner()
            .matmul(weight.clone().inner().transpose());
        if logits.dtype() != DType::F32 {
            logits = logits.cast(DType::F32);
        }
        if temperature != 1.0 {
            logits = logits / temperature;
        }
        let (picked, residual) = if crate::host::serves(&device) {
            let (picked, residual) = crate::host::target_log_softmax(logits, &targets, tracked);
            (picked.reshape([n, 1]), residual)
        } else {
            let probs = softmax(logits.clone(), 1);
            // The largest probability is exp(max - lse), at least 1 / vocab: no underflow.
            let log_sum_exp = logits.clone().max_dim(1) - probs.clone().max_dim(1).log();
            let at =
                Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device.clone().inner())
                    .reshape([n, 1]);
            let picked = logits.gather(1, at.clone()) - log_sum_exp;
            let residual = tracked.then(|| {
                let minus_one = Tensor::<2>::full([n, 1], -1.0, &at.device());
                probs.scatter(1, at, minus_one, IndexingUpdateOp::Add)
            });
            (picked, residual)
        };
        let Some(residual) = residual else {
            return picked.reshape([rows, time]);
        };

        // In the graph: zero in value, the log-softmax's gradient in derivative.
        let picked = Tensor::from_inner(picked);
        let residual = Tensor::from_inner(residual).cast(weight.dtype());
        let mut tangent = (hidden * residual.matmul(weight))
            .cast(DType::F32)
            .sum_dim(1)
            .neg();
        if temperature != 1.0 {
            tangent = tangent / temperature;
        }
        (picked + (tangent.clone() - tangent.detach())).reshape([rows, time])
    }

    /// The language-model head's weight as `[vocab, hidden]` rows at `dtype`, when the head is
    /// a plain float matrix: `None` for a packed (quantised) head and for a LoRA-adapted head
    /// under adapter dropout (whose product is not one matrix), which take the logits' path.
    fn head_rows(&self, dtype: DType) -> Option<Tensor<2>> {
        let weight = match &self.lm_head {
            Some(head) => {
                let dropped = self.adapter_dropout.is_some_and(|d| d.prob > 0.0)
                    && head.weight.adapter().is_some();
                if dropped {
                    return None;
                }
                head.weight.val().transpose()
            }
            None => self.embed_tokens.weight.val(),
        };
        if !weight.dtype().is_float() {
            return None;
        }
        Some(if weight.dtype() == dtype {
            weight
        } else {
            weight.cast(dtype)
        })
    }

    pub fn forward(&self, input: &StepInput, cache: Option<&mut KvCache>) -> Tensor<3> {
        let hidden = self.hidden_states(input, cache);
        self.lm_logits(hidden)
    }

    /// Logits of unpadded sequences of equal length, the simplest entry point.
    pub fn logits(&self, tokens: &[Vec<u32>]) -> Tensor<3> {
        let valid = tokens.iter().map(|r| vec![true; r.len()]).collect();
        let starts = vec![0; tokens.len()];
        self.forward(
            &StepInput::from_padded(tokens.to_vec(), valid, &starts),
            None,
        )
    }
}

/// cos and sin tables `[batch, 1, time, head_dim]` for the given positions, computed in f32 as
/// `transformers` does so the two agree to rounding. Dynamic scaling reads the length of the
/// pass from its largest position, as `transformers` does per forward call (which then keeps
/// the largest length it has seen until a call is shorter than `max_positions`; here every
/// pass stands alone).
fn rope_tables(
    positions: &[Vec<usize>],
    head_dim: usize,
    rope: &Rope,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let half = head_dim / 2;
    let mut theta = rope.theta as f32;
    let mut stretch = 1.0f32;
    match rope.scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => stretch = factor as f32,
        Some(RopeScaling::Dynamic { factor }) => {
            let len = positions.iter().flatten().max().map_or(0, |&p| p + 1);
            if len > rope.max_positions {
                // As torch computes it: the ratio in f32 (with `factor - 1` taken in double),
                // the power in double, rounded once.
                let ratio =
                    factor as f32 * len as f32 / rope.max_positions as f32 - (factor - 1.0) as f32;
                let exponent = head_dim as f64 / (head_dim as f64 - 2.0);
                theta *= (ratio as f64).powf(exponent) as f32;
            }
        }
    }
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32) / stretch)
        .collect();
    let batch = positions.len();
    let time = positions.first().map_or(0, |r| r.len());
    let mut cos = Vec::with_capacity(batch * time * head_dim);
    let mut sin = Vec::with_capacity(batch * time * head_dim);
    for row in positions {
        for &pos in row {
            for _repeat in 0..2 {
                for &freq in &inv_freq {
                    let angle = pos as f32 * freq;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
    }
    let shape = [batch, 1, time, head_dim];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// The attention mask `[batch, 1, queries, keys]`, true where a query may not look: the last
/// `queries` slots attend to every earlier real slot (causal) of the same segment, and never to
/// padding. A query with nothing to attend to (a padding slot with only padding before it)
/// looks at itself, so no row is empty and no backend divides by zero; its output is never
/// read, since no real query attends to a padding slot.
fn attention_mask(
    key_valid: &[Vec<bool>],
    segments: Option<&[Vec<u32>]>,
    queries: usize,
    device: &Device,
) -> Tensor<4, Bool> {
    let batch = key_valid.len();
    let keys = key_valid.first().map_or(0, |r| r.len());
    let offset = keys - queries;
    let flip = sdpa_mask_means_attend(device);
    let mut masked = Vec::with_capacity(batch * queries * keys);
    for (b, row) in key_valid.iter().enumerate() {
        let segment = segments.map(|s| &s[b]);
        for q in 0..queries {
            let start = masked.len();
            for (k, &real) in row.iter().enumerate() {
                let same = segment.is_none_or(|s| s[k] == s[offset + q]);
                masked.push(!(real && same && k <= offset + q));
            }
            if masked[start..].iter().all(|&m| m) {
                masked[start + offset + q] = false;
            }
        }
    }
    if flip {
        masked.iter_mut().for_each(|m| *m = !*m);
    }
    Tensor::from_data(TensorData::new(masked, [batch, 1, queries, keys]), device)
}

/// burn-tch 0.22.1 hands burn's attention mask (true: masked) to libtorch's
/// `scaled_dot_product_attention` unchanged, where a boolean mask means the opposite (true:
/// attends); so on libtorch without autodiff (autodiff runs burn's own attention, which reads
/// the mask as burn defines it) the mask is given the other way round. The golden tests run on
/// `tch:cpu` and would catch a change of either.
fn sdpa_mask_means_attend(device: &Device) -> bool {
    !device.is_autodiff() && format!("{device:?}").contains("LibTorch")
}

/// `log_softmax(logits / temperature)` over the first `vocab_limit` ids, `[rows, time, vocab]`,
/// and the log-probability of each slot's target id, `[rows, time]`. `targets` holds
/// `rows * time` ids in row order, each below the limit. Used for the SFT loss (temperature 1,
/// the whole vocabulary) and PPO's log-probabilities of sampled tokens.
pub fn token_log_probs(
    logits: Tensor<3>,
    targets: Vec<i64>,
    temperature: f64,
    vocab_limit: usize,
) -> (Tensor<2>, Tensor<3>) {
    let [rows, time, vocab] = logits.dims();
    let limit = vocab.min(vocab_limit.max(1));
    let mut logits = logits;
    // Skipped when they change nothing: the full-vocabulary, temperature-1 case (the SFT loss)
    // is then a plain log-softmax.
    if limit < vocab {
        logits = logits.slice([0..rows, 0..time, 0..limit]);
    }
    if temperature != 1.0 {
        logits = logits / temperature;
    }
    // The loss and log-probabilities in f32, whatever the model computes in.
    if logits.dtype() != DType::F32 {
        logits = logits.cast(DType::F32);
    }
    let log_probs = log_softmax(logits, 2);
    let device = log_probs.device();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [rows, time, 1]), &device);
    let picked = log_probs.clone().gather(2, targets).reshape([rows, time]);
    (picked, log_probs)
}

/// Copies a float tensor to the host as f32.
pub fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("a float tensor converted to f32 reads back as f32")
}

/// [`to_host`] for numbers that must be finite (logits, scores): NaN or infinity is an error
/// naming `what`.
pub fn finite_to_host<const D: usize>(
    t: Tensor<D>,
    what: &'static str,
) -> crate::error::Result<Vec<f32>> {
    let values = to_host(t);
    if values.iter().all(|v| v.is_finite()) {
        Ok(values)
    } else {
        Err(crate::error::LlamaError::NonFinite(what))
    }
}
