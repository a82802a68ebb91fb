//! The optimizer, in one place so every trainer (and LoRA later) selects parameters the same
//! way: AdamW with decoupled weight decay on matrices only (norm weights are not decayed), and
//! gradient clipping by the global norm over all parameters, as PyTorch's `clip_grad_norm_`
//! (burn's built-in clipping is per tensor).

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamW, AdamWConfig, AdamWState, GradientsParams, ModuleOptimizer, Optimizer};
use burn::prelude::*;

use crate::recipe::TrainSection;

/// AdamW as the recipe says; parameters whose path contains "norm" get no weight decay.
pub fn adamw(train: &TrainSection) -> ModuleOptimizer {
    let config = |weight_decay: f64| {
        AdamWConfig::new()
            .with_beta_1(train.betas[0] as f32)
            .with_beta_2(train.betas[1] as f32)
            .with_epsilon(train.eps as f32)
            .with_weight_decay(weight_decay as f32)
    };
    ModuleOptimizer::from(MomentsAtParamDtype(config(train.weight_decay).build())).with_group(
        ParamGroup::from_predicate("norm"),
        MomentsAtParamDtype(config(0.0).build()),
        None,
    )
}

/// burn's AdamW, with its moments brought to the gradient's dtype before each step. burn reads
/// an optimizer record back at the device's default dtype (f32), so a resumed bf16 run would
/// otherwise meet bf16 gradients with f32 moments: refused by flex, silently promoted (and
/// then no longer exact) by libtorch. A no-op for f32 runs.
#[derive(Clone)]
struct MomentsAtParamDtype(AdamW);

impl Optimizer for MomentsAtParamDtype {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let dtype = grad.dtype();
        let at = |t: Tensor<D>| if t.dtype() == dtype { t } else { t.cast(dtype) };
        let state = state.map(|mut state| {
            let m = &mut state.momentum;
            m.moment_1 = at(m.moment_1.clone());
            m.moment_2 = at(m.moment_2.clone());
            m.max_moment_2 = m.max_moment_2.take().map(at);
            state
        });
        self.0.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let sum = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total + sum,
                None => sum,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.factor));
        }
    }
}

/// The global L2 norm of all gradients (one host sync).
pub fn grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = SquaredNorm { grads, total: None };
    model.visit(&mut visitor);
    visitor
        .total
        .map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt())
}

/// Scales all gradients so their global norm is at most `max_norm` (none or 0: no clipping);
/// returns the norm before clipping (what the metrics log).
pub fn clip_grad_norm<M: Module>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: Option<f64>,
) -> f64 {
    let norm = grad_norm(model, grads);
    // 0 turns clipping off (as in `transformers`); the recipe check refuses negative values.
    if let Some(max) = max_norm.filter(|&max| max > 0.0) {
        if norm.is_finite() && norm > max {
            let mut visitor = Scale {
                grads,
                factor: max / (norm + 1e-6),
            };
            model.visit(&mut visitor);
        }
    }
    norm
}
