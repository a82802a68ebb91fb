//! The PPO update: `ppo_epochs` passes over the rollouts in shuffled mini-batches, one clipped
//! policy step and one clipped value step per mini-batch, each mini-batch through the models a
//! micro-batch at a time with its gradients accumulated. Losses, clip statistics, gradient norms
//! and the clipping itself stay on the device: the mini-batch loop reads nothing back.

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use llama::Llama;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use trainer::chunked::{model_grads, GradPlan};
use trainer::optim::clip_grad_norm_on_device;
use trainer::step::DeviceSum;

use crate::algo::{kl_k3, policy_loss, value_loss};
use crate::iteration::Ppo;
use crate::rollout::{
    chunk_logprobs, next_token_slice, pad_rollouts, response_mask, scatter, Rollout,
};
use crate::section::KlPenalty;

/// Per-token quantities of each rollout (at its response positions) that the update fits.
pub struct Targets<'a> {
    pub old_logp: &'a [Vec<f64>],
    pub ref_logp: &'a [Vec<f64>],
    pub old_values: &'a [Vec<f64>],
    pub advantages: &'a [Vec<f64>],
    pub returns: &'a [Vec<f64>],
}

/// What the update measured.
#[derive(Default)]
pub struct UpdateStats {
    /// Sums over mini-batches; divided by `steps` for the metrics.
    policy_loss: DeviceSum,
    value_loss: DeviceSum,
    steps: usize,
    /// Sums over response tokens; divided by `tokens` for the metrics.
    clipped: DeviceSum,
    approx_kl: DeviceSum,
    tokens: usize,
    /// Prompt and response tokens through the models (for update tokens/s).
    pub sequence_tokens: usize,
    /// The last mini-batch's gradient norms (before clipping).
    grad_norm: Option<Tensor<1>>,
    value_grad_norm: Option<Tensor<1>>,
    /// Whether a value model was trained (GAE).
    has_value: bool,
}

impl UpdateStats {
    /// The update's metrics (one host read of each device sum); the value model's only when
    /// there is one.
    pub fn metrics(self) -> Vec<(&'static str, f64)> {
        let seen = self.tokens.max(1) as f64;
        let steps = self.steps.max(1) as f64;
        let mut metrics = vec![
            ("clip_fraction", self.clipped.read() / seen),
            ("approx_kl", self.approx_kl.read() / seen),
            ("policy_loss", self.policy_loss.read() / steps),
            ("grad_norm", read(self.grad_norm)),
        ];
        if self.has_value {
            metrics.push(("value_loss", self.value_loss.read() / steps));
            metrics.push(("value_grad_norm", read(self.value_grad_norm)));
        }
        metrics
    }
}

/// A norm on the device as a number (0 when there were no gradients).
fn read(norm: Option<Tensor<1>>) -> f64 {
    norm.map_or(0.0, |n| n.into_scalar::<f32>() as f64)
}

/// One AdamW step of `model` with `grads`, clipped by their global norm (returned, before
/// clipping, on the device).
fn clipped_step(
    optimizer: &mut ModuleOptimizer,
    model: Llama,
    mut grads: GradientsParams,
    lr: f64,
    grad_clip: Option<f64>,
) -> (Llama, Option<Tensor<1>>) {
    let grad_norm = clip_grad_norm_on_device(&model, &mut grads, grad_clip);
    (optimizer.step(lr, model, grads), grad_norm)
}

impl Ppo {
    /// `ppo_epochs` passes over the rollouts in shuffled mini-batches: one clipped policy step
    /// and one clipped value step per mini-batch.
    pub(crate) fn update(
        &mut self,
        rollouts: &[Rollout],
        t: &Targets<'_>,
        iteration: usize,
    ) -> UpdateStats {
        let s = self.settings.clone();
        let mini = self.mini_batch.max(1);
        let micro = self.micro_batch.clamp(1, mini);
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (iteration as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
        );
        let mut u = UpdateStats {
            has_value: self.value.is_some(),
            ..UpdateStats::default()
        };
        for epoch in 0..s.ppo_epochs {
            let mut order: Vec<usize> = (0..rollouts.len()).collect();
            order.shuffle(&mut rng);
            for (index, mini_batch) in order.chunks(mini).enumerate() {
                let count: usize = mini_batch.iter().map(|&i| rollouts[i].response.len()).sum();
                let mut policy_grads = GradientsAccumulator::<Llama>::new();
                let mut value_grads = GradientsAccumulator::<Llama>::new();
                // The mini-batch `micro` rollouts at a time, gradients accumulated: each
                // piece's losses are sums over its tokens divided by the mini-batch's count.
                for (part, piece) in mini_batch.chunks(micro).enumerate() {
                    let pass = [iteration, epoch, index, part].map(|n| n as u64);
                    let plan = self.grad_plan.at(&pass);
                    let (policy, value) = self.piece_grads(rollouts, t, piece, count, plan, &mut u);
                    policy_grads.accumulate(&self.policy, policy);
                    if let (Some(model), Some(grads)) = (&self.value, value) {
                        value_grads.accumulate(model, grads);
                    }
                }
                u.tokens += count;
                u.steps += 1;
                let (policy, grad_norm) = clipped_step(
                    &mut self.policy_optimizer,
                    self.policy.clone(),
                    policy_grads.grads(),
                    self.lr,
                    self.grad_clip,
                );
                self.policy = policy;
                u.grad_norm = grad_norm;
                if let Some(model) = self.value.take() {
                    let (value, grad_norm) = clipped_step(
                        &mut self.value_optimizer,
                        model,
                        value_grads.grads(),
                        self.value_lr,
                        self.grad_clip,
                    );
                    self.value = Some(value);
                    u.value_grad_norm = grad_norm;
                }
            }
        }
        u
    }

    /// The policy's and (GAE) the value model's gradients on the rollouts `piece` of a
    /// mini-batch whose response tokens number `count`, with their losses and statistics added
    /// to `u`. With `kl_penalty = "loss"` the policy loss has the term `β · k3` per token.
    fn piece_grads(
        &self,
        rollouts: &[Rollout],
        t: &Targets<'_>,
        piece: &[usize],
        count: usize,
        plan: GradPlan,
        u: &mut UpdateStats,
    ) -> (GradientsParams, Option<GradientsParams>) {
        let s = &self.settings;
        let device = self.policy.device();
        let batch: Vec<&Rollout> = piece.iter().map(|&i| &rollouts[i]).collect();
        let padded = pad_rollouts(&batch, self.pad);
        let tensor = |field: &[Vec<f64>]| {
            let rows: Vec<&[f64]> = piece.iter().map(|&i| field[i].as_slice()).collect();
            scatter(&batch, &rows, &padded, &device)
        };
        let mask = response_mask(&batch, &padded, &device);
        u.sequence_tokens += batch
            .iter()
            .map(|r| r.prompt.len() + r.response.len())
            .sum::<usize>();

        let old_t = tensor(t.old_logp);
        let advantages = tensor(t.advantages);
        let kl_beta = match s.kl_penalty() {
            KlPenalty::Loss => self.kl.beta,
            KlPenalty::Reward => 0.0,
        };
        let ref_t = (kl_beta > 0.0).then(|| tensor(t.ref_logp));
        let policy = &self.policy;
        let policy_plan = GradPlan {
            chunk: self.loss_chunk,
            ..plan
        };
        let (loss, policy_grads) = model_grads(
            policy,
            &padded.input,
            policy_plan,
            |hidden| next_token_slice(hidden, &padded),
            |part, range| {
                let logp = chunk_logprobs(
                    policy,
                    part,
                    &padded,
                    range.clone(),
                    s.temperature,
                    self.vocab_limit,
                );
                let rows = batch.len();
                let cols = |x: &Tensor<2>| x.clone().slice([0..rows, range.clone()]);
                let (old, mask) = (cols(&old_t), cols(&mask));
                let log_ratio = logp.clone().detach() - old.clone();
                u.approx_kl
                    .add((log_ratio.clone().square() * mask.clone()).sum() * 0.5);
                let outside = (log_ratio.exp() - 1.0).abs().greater_elem(s.clip_range);
                u.clipped.add((outside.float() * mask.clone()).sum());
                // Masked before the exponential: outside the response both are 0 (k3 = 0),
                // where a prompt or pad token's log-probability could overflow exp.
                let kl = ref_t.as_ref().map(|r| {
                    (kl_k3(logp.clone() * mask.clone(), cols(r)) * mask.clone()).sum() * kl_beta
                });
                let loss = policy_loss(logp, old, cols(&advantages), mask, s.clip_range, count);
                match kl {
                    Some(kl) => loss + kl / (count.max(1) as f64),
                    None => loss,
                }
            },
        );
        u.policy_loss.add(loss);

        let Some(value) = &self.value else {
            return (policy_grads, None);
        };
        let (old_values, returns) = (tensor(t.old_values), tensor(t.returns));
        let (vloss, value_grads) = model_grads(
            value,
            &padded.input,
            plan.unchunked(),
            |hidden| next_token_slice(hidden, &padded),
            |hidden, _| {
                value_loss(
                    value.scalar_outputs(hidden),
                    old_values.clone(),
                    returns.clone(),
                    mask.clone(),
                    s.value_clip_range,
                    count,
                ) * s.value_coef
            },
        );
        u.value_loss.add(vloss);
        (policy_grads, Some(value_grads))
    }
}
