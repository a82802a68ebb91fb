//! The pairwise ranking loss with the rating margin and optional reward centering.

use crate::section::RewardSection;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::TensorData;
use data::batch::PairBatch;
use data::Rating;
use llama::{Llama, StepInput};
use trainer::chunked::{model_grads, GradPlan};

/// The margin of each pair: from its rating through the recipe's table, else its numeric
/// `margin`, else 0. `margin = "none"` gives 0 everywhere.
pub fn pair_margins(batch: &PairBatch, section: &RewardSection) -> Vec<f32> {
    let table = section.margins();
    let off = section.margin == crate::section::MarginKind::None;
    batch
        .ratings
        .iter()
        .zip(&batch.margins)
        .map(|(rating, margin)| {
            if off {
                return 0.0;
            }
            match (rating, margin) {
                (Some(r), _) => table[rating_index(*r)] as f32,
                (None, Some(m)) => *m,
                (None, None) => 0.0,
            }
        })
        .collect()
}

/// The position of a rating in margin tables, strongest first.
pub fn rating_index(rating: Rating) -> usize {
    Rating::ALL
        .iter()
        .position(|&r| r == rating)
        .expect("every rating is listed in Rating::ALL")
}

/// Scores of every row of a pair batch, `[2 * pairs]`: chosen rows first, then rejected. Both
/// answers of every pair go through the model in one forward pass.
pub fn batch_scores(model: &Llama, batch: &PairBatch) -> Tensor<1> {
    model.last_token_scores(&pair_input(batch))
}

/// The model input of a pair batch: every row from position 0.
pub fn pair_input(batch: &PairBatch) -> StepInput {
    let starts = vec![0; batch.tokens.len()];
    StepInput::from_padded(batch.tokens.clone(), batch.valid.clone(), &starts)
}

/// The loss (detached) of a micro-batch of pairs, its gradients, and how many of its pairs the
/// model ranks right (on the device), with the trunk's gradients taken as `plan` says.
pub fn pair_loss_and_grads(
    model: &Llama,
    batch: &PairBatch,
    margins: &[f32],
    centering: f64,
    global_pairs: usize,
    plan: GradPlan,
) -> (Tensor<1>, GradientsParams, Tensor<1>) {
    let input = pair_input(batch);
    let pairs = margins.len();
    let mut right = None;
    let (loss, grads) = model_grads(
        model,
        &input,
        plan.unchunked(),
        |h| h,
        |hidden, _| {
            let scores = model.last_token_scores_of(hidden, &input);
            let detached = scores.clone().detach();
            right = Some(
                detached
                    .clone()
                    .slice(0..pairs)
                    .greater(detached.slice(pairs..2 * pairs))
                    .float()
                    .sum(),
            );
            pair_loss(scores, margins, centering, global_pairs)
        },
    );
    (loss, grads, right.expect("the loss was computed"))
}

/// `sum over pairs of -log σ(r_c - r_r - m) + centering * (r_c + r_r)^2`, divided by the
/// number of pairs in the global batch, so micro-batch gradients sum to the global mean's.
/// `scores` holds the chosen rows first, then the rejected ones.
pub fn pair_loss(
    scores: Tensor<1>,
    margins: &[f32],
    centering: f64,
    global_pairs: usize,
) -> Tensor<1> {
    let pairs = margins.len();
    let device = scores.device();
    let chosen = scores.clone().slice(0..pairs);
    let rejected = scores.slice(pairs..2 * pairs);
    let margin = Tensor::<1>::from_data(TensorData::new(margins.to_vec(), [pairs]), &device);
    let mut loss = log_sigmoid(chosen.clone() - rejected.clone() - margin)
        .neg()
        .sum();
    if centering > 0.0 {
        loss = loss + (chosen + rejected).square().sum() * centering;
    }
    loss / (global_pairs.max(1) as f64)
}
