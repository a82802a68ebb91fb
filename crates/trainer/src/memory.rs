//! The memory plan of a run, said before it starts: what its models, gradients, optimizer state,
//! activations and logits will take, from the shapes alone. Each method describes its passes
//! (how many sequences of how many positions go through which model, with which head); the
//! plan is refused when it exceeds what the device has.
//!
//! The activation estimate counts the tensors our decoder keeps for its backward pass under
//! burn's autodiff, per layer and position, with `d` the hidden size, `kv` the
//! key/value width, `f` the MLP width, `h` the heads and `t` the keys a position attends to:
//! the two RMSNorms (3d each: the input, its statistics, the normed output), q and k before and
//! after RoPE and v (2d + 3kv), attention (4ht: scores, scaled and masked scores, the softmax's
//! intermediate and its output, as burn's attention fallback kept them; `llama::model::attend`
//! now keeps only the softmax, so this overstates it), the attention output (d), the MLP (5f:
//! gate, its sigmoid, SiLU, up, the product): 9d + 3kv + 4ht + 5f. With activation checkpointing each layer is
//! recomputed in the backward pass: every layer's input (d) is kept, and one layer's
//! activations exist at a time. These are values of the compute dtype (f32, or bf16 in both bf16
//! modes), except the attention terms (`ht`), which are always f32.
//! The language-model head keeps its logits, their log-softmax and intermediate, and their
//! gradient: 4 x `[rows, positions, vocab]` f32, for one chunk of positions when the loss is
//! chunked.

use llama::LlamaConfig;

use crate::error::{Result, TrainError};
use crate::recipe::{LoraSection, Precision, Recipe, TrainSection};

const F32: u64 = 4;
/// f32 copies of the logits alive at the peak of a pass through the LM head.
const LOGIT_COPIES: u64 = 4;

/// Bytes per device, by what holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// Every model held: trained and frozen.
    pub weights: u64,
    pub gradients: u64,
    /// AdamW's two moments.
    pub optimizer: u64,
    /// What the largest backward pass keeps from its forward pass.
    pub activations: u64,
    /// The language-model head's logits (and their gradient) at that pass.
    pub logits: u64,
    pub total: u64,
}

/// One forward (and backward) pass through a model.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Sequences in the micro-batch.
    pub rows: usize,
    /// Positions per sequence.
    pub positions: usize,
    /// Through the language-model head (false: a scalar head).
    pub lm_head: bool,
}

impl MemoryPlan {
    /// A model trained in full with AdamW in f32 on `pass` as `train` says (activation
    /// checkpointing, loss chunks).
    pub fn trained(config: &LlamaConfig, pass: Pass, train: &TrainSection) -> Self {
        Self::build(config, pass, train, None, Precision::F32)
    }

    /// A model trained as `recipe` says: in full or with its `[lora]` adapters, in its
    /// `runtime.dtype`.
    pub fn for_recipe(config: &LlamaConfig, pass: Pass, recipe: &Recipe) -> Self {
        Self::build(
            config,
            pass,
            &recipe.train,
            recipe.lora.as_ref(),
            recipe.runtime.precision(),
        )
    }

    /// A model trained through LoRA adapters in f32 (see [`MemoryPlan::build`]).
    pub fn lora(
        config: &LlamaConfig,
        pass: Pass,
        train: &TrainSection,
        lora: &LoraSection,
    ) -> Self {
        Self::build(config, pass, train, Some(lora), Precision::F32)
    }

    /// The plan of one trained model.
    ///
    /// Precision: `f32` stores and computes in 4 bytes; `bf16` stores weights, gradients and
    /// both moments in 2 bytes and activations in 2 (attention scores stay f32: they are
    /// computed in f32); `bf16-mixed` stores in 4 bytes, computes in 2, and keeps the bf16 copy
    /// of each weight its matrix product used for the backward pass (2 bytes per parameter).
    ///
    /// LoRA: the frozen base (its target projections packed when quantised) and the factors
    /// are weights; gradients and AdamW moments are the factors' (and a scalar head's) only.
    /// Activations are those of full fine-tuning (gradients still flow through every layer)
    /// plus what burn's LoRA keeps: it composes each adapted weight densely (`base + scale * a
    /// @ b`) and keeps that for the backward pass, which forms one weight-shaped gradient at a
    /// time.
    pub fn build(
        config: &LlamaConfig,
        pass: Pass,
        train: &TrainSection,
        lora: Option<&LoraSection>,
        precision: Precision,
    ) -> Self {
        let stored = precision.weight_bytes();
        let act = precision.activation_bytes();
        let params = config.parameter_count();
        let rows = pass.rows as u64;
        let positions = pass.positions as u64;
        let (d, kv, f) = (
            config.hidden_size as u64,
            config.kv_dim() as u64,
            config.intermediate_size as u64,
        );
        let h = config.num_attention_heads as u64;
        let layers = config.num_hidden_layers as u64;
        let (dense, scores) = (9 * d + 3 * kv + 5 * f, 4 * h * positions);
        let one_layer = dense * act + scores * F32;
        // The embedding output and the final norm, beside the layers.
        let around = 4 * d * act;
        let checkpointed = train.activation_checkpointing;
        let mut activations = rows
            * positions
            * if checkpointed {
                // Every layer's input, and one layer recomputed with its graph.
                layers * d * act + one_layer + around
            } else {
                layers * one_layer + around
            };
        let logits = if pass.lm_head {
            let chunk = match train.loss_chunk {
                0 => positions,
                c => (c as u64).min(positions),
            };
            LOGIT_COPIES * rows * chunk * config.vocab_size as u64 * F32
        } else {
            0
        };
        let Some(lora) = lora else {
            if precision == Precision::Bf16Mixed {
                // The bf16 copies of the weights the products used (one layer's when
                // recomputed).
                activations += 2 * params / if checkpointed { layers } else { 1 };
            }
            return Self {
                weights: params * stored,
                gradients: params * stored,
                optimizer: 2 * params * stored,
                activations,
                logits,
                total: 0,
            }
            .totalled();
        };
        let rank = lora.rank as u64;
        let shape = |target: &str| match target {
            "q_proj" | "o_proj" => (d, d),
            "k_proj" | "v_proj" => (d, kv),
            "gate_proj" | "up_proj" => (d, f),
            _ => (f, d),
        };
        let (mut adapted, mut factors, mut largest) = (0u64, 0u64, 0u64);
        for target in &lora.targets {
            let (d_in, d_out) = shape(target);
            adapted += layers * d_in * d_out;
            factors += layers * rank * (d_in + d_out);
            largest = largest.max(d_in * d_out);
        }
        let head = if pass.lm_head { 0 } else { d };
        let trainable = factors + head;
        // The frozen base in bf16 in both bf16 modes; what trains stays f32.
        let frozen = if precision == Precision::F32 { F32 } else { 2 };
        let base = match lora.quantize_base.bytes_per_value() {
            Some(bytes) => (params - adapted) * frozen + (adapted as f64 * bytes).ceil() as u64,
            None => params * frozen,
        };
        // The composed weights (f32, as the factors) and their bf16 casts: every layer's, or
        // one layer's when layers are recomputed.
        let kept = if checkpointed {
            adapted / layers
        } else {
            adapted
        };
        let composed = if precision == Precision::F32 {
            F32
        } else {
            F32 + 2
        };
        activations += kept * composed + 2 * largest * F32;
        Self {
            weights: base + factors * F32,
            gradients: trainable * F32,
            optimizer: 2 * trainable * F32,
            activations,
            logits,
            total: 0,
        }
        .totalled()
    }

    /// A frozen model stored as `precision` stores weights.
    pub fn frozen_as(config: &LlamaConfig, precision: Precision) -> Self {
        Self {
            weights: config.parameter_count() * precision.weight_bytes(),
            ..Self::default()
        }
        .totalled()
    }

    /// A frozen model (a reference policy, a reward model): its weights only.
    pub fn frozen(config: &LlamaConfig) -> Self {
        Self {
            weights: config.parameter_count() * F32,
            ..Self::default()
        }
        .totalled()
    }

    /// Inference-only memory beside the models, such as a generation KV cache.
    pub fn buffers(bytes: u64) -> Self {
        Self {
            activations: bytes,
            ..Self::default()
        }
        .totalled()
    }

    /// Two parts held at the same time: their weights, gradients and optimizer states add up,
    /// and so do their activations and logits (a conservative bound when the passes run one
    /// after the other).
    pub fn and(self, other: Self) -> Self {
        Self {
            weights: self.weights + other.weights,
            gradients: self.gradients + other.gradients,
            optimizer: self.optimizer + other.optimizer,
            activations: self.activations + other.activations,
            logits: self.logits + other.logits,
            total: 0,
        }
        .totalled()
    }

    fn totalled(mut self) -> Self {
        self.total =
            self.weights + self.gradients + self.optimizer + self.activations + self.logits;
        self
    }

    /// One line for the start of a run.
    pub fn summary(&self) -> String {
        format!(
            "memory plan: weights {}, gradients {}, optimizer {}, activations {}, logits {}: \
             total {}",
            human_bytes(self.weights),
            human_bytes(self.gradients),
            human_bytes(self.optimizer),
            human_bytes(self.activations),
            human_bytes(self.logits),
            human_bytes(self.total)
        )
    }

    /// Refuses a plan larger than `available` bytes (when known), naming what to change.
    pub fn check(&self, available: Option<u64>, device: &str) -> Result<()> {
        match available {
            Some(available) if self.total > available => Err(TrainError::Invalid(format!(
                "this run needs about {} but {device} has {} available ({}); lower \
                 train.micro_batch_size or data.max_seq_len, or set \
                 train.activation_checkpointing = true or train.loss_chunk",
                human_bytes(self.total),
                human_bytes(available),
                self.summary()
            ))),
            _ => Ok(()),
        }
    }
}

/// Bytes as GiB or MiB, one decimal.
pub fn human_bytes(n: u64) -> String {
    let gib = n as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}
