//! Gradients through the language-model head a chunk of positions at a time, so the
//! `[rows, positions, vocab]` logits (32000 wide for Llama 2) and their gradient never exist
//! whole. The trunk runs once and its output is cut from the graph; each chunk's backward pass
//! gives the head's gradients and that chunk's share of the output's gradient; one backward
//! pass of `sum(hidden * d_hidden)` then takes the trunk's. For a loss that is a sum over
//! positions, the loss and the gradients are those of one pass, to rounding.

use std::ops::Range;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use llama::Llama;

/// The loss (detached) and gradients of `model` for `chunk_loss`, summed over chunks of at most
/// `chunk` positions of `hidden` (`[rows, positions, dim]`, with its graph); 0 or a chunk as
/// long as the sequence: one pass. `chunk_loss` gets the hidden states of the positions
/// `range` and returns their share of the loss.
pub fn head_chunked_grads(
    model: &Llama,
    hidden: Tensor<3>,
    chunk: usize,
    mut chunk_loss: impl FnMut(Tensor<3>, Range<usize>) -> Tensor<1>,
) -> (Tensor<1>, GradientsParams) {
    let [rows, width, dim] = hidden.dims();
    if chunk == 0 || chunk >= width {
        let loss = chunk_loss(hidden, 0..width);
        let grads = GradientsParams::from_grads(loss.backward(), model);
        return (loss.detach(), grads);
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
    if let Some(d_hidden) = d_hidden {
        let surrogate = (hidden * Tensor::from_inner(d_hidden)).sum();
        accumulator.accumulate(
            model,
            GradientsParams::from_grads(surrogate.backward(), model),
        );
    }
    let loss = loss_sum.expect("a pass has at least one position");
    (loss, accumulator.grads())
}

/// The position ranges of `width` positions in chunks of `chunk` (0: one range).
pub fn chunks(width: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let step = if chunk == 0 { width.max(1) } else { chunk };
    (0..width)
        .step_by(step)
        .map(move |start| start..(start + step).min(width))
}
