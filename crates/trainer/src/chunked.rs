//! Gradients through the language-model head a chunk of positions at a time, so the
//! `[rows, positions, vocab]` logits (32000 wide for Llama 2) and their gradient never exist
//! whole. The trunk runs once and its output is cut from the graph; each chunk's backward pass
//! gives the head's gradients and that chunk's share of the output's gradient; one backward
//! pass of `sum(hidden * d_hidden)` then takes the trunk's. For a loss that is a sum over
//! positions, the loss and the gradients are those of one pass, to rounding.

use std::ops::Range;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use llama::{Llama, StepInput};

/// How a training pass takes its gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct GradPlan {
    /// Positions per chunk of the head and the loss (0: all at once).
    pub chunk: usize,
    /// Activation checkpointing: keep only each decoder layer's input from the forward pass and
    /// recompute the layer in the backward pass.
    pub layerwise: bool,
    /// LoRA dropout (`[lora] dropout`; 0: none) and the pass's seed for its masks.
    pub dropout: f64,
    pub pass_seed: u64,
}

impl GradPlan {
    pub fn new(train: &crate::recipe::TrainSection) -> Self {
        Self {
            chunk: train.loss_chunk,
            layerwise: train.activation_checkpointing,
            dropout: 0.0,
            pass_seed: train.seed,
        }
    }

    /// [`GradPlan::new`] with the recipe's LoRA dropout.
    pub fn for_recipe(recipe: &crate::Recipe) -> Self {
        Self {
            dropout: recipe.lora.as_ref().map_or(0.0, |lora| lora.dropout),
            ..Self::new(&recipe.train)
        }
    }

    /// The plan of one pass, named by `parts` (step, micro-batch, ...): its dropout masks are
    /// drawn from them and the run's seed, so a resumed run draws the same ones.
    pub fn at(self, parts: &[u64]) -> Self {
        let pass_seed = parts.iter().fold(self.pass_seed, |seed, &part| {
            (seed ^ part).wrapping_mul(0x0100_0000_01b3).rotate_left(17)
        });
        Self { pass_seed, ..self }
    }

    /// The same plan with the head and loss in one piece (scalar heads).
    pub fn unchunked(self) -> Self {
        Self { chunk: 0, ..self }
    }
}

/// The loss (detached) and the gradients of `model` on `input` for a loss read from the final
/// hidden states: `select` takes the states the loss reads (`[rows, positions, dim]`) from them,
/// and `chunk_loss` gets those of the positions `range`, `plan.chunk` at a time, and returns
/// their share of the loss.
///
/// With `plan.layerwise`, the forward pass runs without a graph keeping each layer's input; the
/// head and loss run on the last layer's output, then each layer, from the top, runs again
/// with its graph and passes its input's gradient down (one backward pass of `sum(output *
/// d_output)` each), and the embeddings take the last. Only one layer's activations exist at a
/// time; the loss and gradients are those of one pass, to rounding.
pub fn model_grads(
    model: &Llama,
    input: &StepInput,
    plan: GradPlan,
    select: impl Fn(Tensor<3>) -> Tensor<3>,
    chunk_loss: impl FnMut(Tensor<3>, Range<usize>) -> Tensor<1>,
) -> (Tensor<1>, GradientsParams) {
    let with_dropout;
    let model = if plan.dropout > 0.0 {
        with_dropout = Llama {
            adapter_dropout: Some(llama::AdapterDropout {
                prob: plan.dropout,
                seed: plan.pass_seed,
            }),
            ..model.clone()
        };
        &with_dropout
    } else {
        model
    };
    if !plan.layerwise {
        let states = select(model.hidden_states(input, None));
        let (loss, grads, _) = head_grads(model, states, None, plan.chunk, chunk_loss);
        return (loss, grads);
    }
    let frozen = model.valid();
    let shared = frozen.layer_inputs(input);
    let layers = model.layers.len();
    let mut layer_inputs = Vec::with_capacity(layers);
    let mut x = frozen.embed(input);
    for index in 0..layers {
        layer_inputs.push(x.clone());
        x = frozen.layer(index, x, &shared);
    }
    drop(frozen);
    let top = Tensor::from_inner(x).require_grad();
    let states = select(model.final_norm(top.clone()));
    let (loss, grads, d_top) = head_grads(model, states, Some(&top), plan.chunk, chunk_loss);
    let mut accumulator = GradientsAccumulator::<Llama>::new();
    accumulator.accumulate(model, grads);
    let Some(mut d_output) = d_top else {
        // The loss does not depend on the hidden states: nothing flows into the layers.
        return (loss, accumulator.grads());
    };
    let shared = model.layer_inputs(input);
    for index in (0..layers).rev() {
        let x = layer_inputs.pop().expect("one input per layer");
        let leaf = Tensor::from_inner(x).require_grad();
        let output = model.layer(index, leaf.clone(), &shared);
        let grads = (output * Tensor::from_inner(d_output)).sum().backward();
        d_output = leaf
            .grad(&grads)
            .expect("a layer's output depends on its input");
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    let embedded = model.embed(input);
    // Frozen embeddings (LoRA) have nothing to learn from the last gradient.
    if embedded.is_tracked() {
        let grads = (embedded * Tensor::from_inner(d_output)).sum().backward();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    (loss, accumulator.grads())
}

/// The loss (detached) and gradients of `model` for `chunk_loss`, summed over chunks of at most
/// `chunk` positions of `hidden` (`[rows, positions, dim]`, with its graph); 0 or a chunk as
/// long as the sequence: one pass. `chunk_loss` gets the hidden states of the positions
/// `range` and returns their share of the loss.
pub fn head_chunked_grads(
    model: &Llama,
    hidden: Tensor<3>,
    chunk: usize,
    chunk_loss: impl FnMut(Tensor<3>, Range<usize>) -> Tensor<1>,
) -> (Tensor<1>, GradientsParams) {
    let (loss, grads, _) = head_grads(model, hidden, None, chunk, chunk_loss);
    (loss, grads)
}

/// [`head_chunked_grads`], also giving the gradient that reaches `input` (a leaf `hidden` was
/// computed from).
fn head_grads(
    model: &Llama,
    hidden: Tensor<3>,
    input: Option<&Tensor<3>>,
    chunk: usize,
    mut chunk_loss: impl FnMut(Tensor<3>, Range<usize>) -> Tensor<1>,
) -> (Tensor<1>, GradientsParams, Option<Tensor<3>>) {
    let [rows, width, dim] = hidden.dims();
    if chunk == 0 || chunk >= width {
        let loss = chunk_loss(hidden, 0..width);
        let grads = loss.backward();
        let d_input = input.and_then(|leaf| leaf.grad(&grads));
        let grads = GradientsParams::from_grads(grads, model);
        return (loss.detach(), grads, d_input);
    }
    let cut = hidden.clone().detach().require_grad();
    let mut accumulator = GradientsAccumulator::<Llama>::new();
    let mut loss_sum: Option<Tensor<1>> = None;
    let mut d_hidden: Option<Tensor<3>> = None;
    for start in (0..width).step_by(chunk) {
        let end = (start + chunk).min(width);
        let part = cut.clone().slice([0..rows, start..end, 0..dim]);
        let loss = chunk_loss(part, start..end);
        let grads = loss.backward();
        if let Some(grad) = cut.grad(&grads) {
            d_hidden = Some(match d_hidden {
                Some(sum) => sum + grad,
                None => grad,
            });
        }
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
        loss_sum = Some(match loss_sum {
            Some(sum) => sum + loss.detach(),
            None => loss.detach(),
        });
    }
    let mut d_input = None;
    if let Some(d_hidden) = d_hidden {
        let surrogate = (hidden * Tensor::from_inner(d_hidden)).sum();
        let grads = surrogate.backward();
        d_input = input.and_then(|leaf| leaf.grad(&grads));
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    let loss = loss_sum.expect("a pass has at least one position");
    (loss, accumulator.grads(), d_input)
}

/// The position ranges of `width` positions in chunks of `chunk` (0: one range).
pub fn chunks(width: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let step = if chunk == 0 { width.max(1) } else { chunk };
    (0..width)
        .step_by(step)
        .map(move |start| start..(start + step).min(width))
}
