//! The optimizer, in one place so every trainer (and LoRA later) selects parameters the same
//! way: AdamW with decoupled weight decay on matrices only (norm weights are not decayed), and
//! gradient clipping by the global norm over all parameters, as PyTorch's `clip_grad_norm_`
//! (burn's built-in clipping is per tensor).

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamW, AdamWConfig, AdamWState, GradientsParams, ModuleOptimizer, Optimizer};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};

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
    ModuleOptimizer::from(MomentsAtParamDtype::new(
        config(train.weight_decay).build(),
        0,
    ))
    .with_group(
        ParamGroup::from_predicate("norm"),
        MomentsAtParamDtype::new(config(0.0).build(), 1),
        None,
    )
}

/// burn's AdamW, with its moments brought to the gradient's dtype before each step. burn reads
/// an optimizer record back at the device's default dtype (f32), so a resumed bf16 run would
/// otherwise meet bf16 gradients with f32 moments: refused by flex, silently promoted (and
/// then no longer exact) by libtorch. A no-op for f32 runs.
///
/// bf16 parameters (pure bf16 runs) take the step in f32 and are rounded back stochastically,
/// moments too: with 8 bits of mantissa, an update smaller than half a bf16 step rounds to
/// nothing under round-to-nearest, so long runs stall (the tiny SFT recipe ended 33% above the
/// f32 loss after 300 steps); stochastic rounding keeps every update in expectation and costs
/// no memory. The noise is drawn from a seed made of the step count in the optimizer state and
/// the parameter's place in the step, so a resumed run draws the same noise.
struct MomentsAtParamDtype {
    adamw: AdamW,
    /// Sets the group's noise apart from the other group's.
    group: u64,
    /// The step count of the last parameter stepped and how many have been stepped since.
    place: std::sync::Mutex<(usize, u64)>,
}

impl MomentsAtParamDtype {
    fn new(adamw: AdamW, group: u64) -> Self {
        Self {
            adamw,
            group,
            place: std::sync::Mutex::new((usize::MAX, 0)),
        }
    }

    /// The seed of this parameter's rounding noise: its step and its index within the step.
    fn noise_seed(&self, time: usize, dims: &[usize]) -> u64 {
        let mut place = self
            .place
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if place.0 != time {
            *place = (time, 0);
        }
        let index = place.1;
        place.1 += 1;
        let seed = dims
            .iter()
            .fold(mix(self.group) ^ (time as u64) << 32 ^ index, |seed, &d| {
                mix(seed ^ d as u64)
            });
        mix(seed)
    }
}

impl Clone for MomentsAtParamDtype {
    fn clone(&self) -> Self {
        Self::new(self.adamw.clone(), self.group)
    }
}

fn mix(x: u64) -> u64 {
    // splitmix64's finaliser: nearby inputs give unrelated seeds.
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

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
        let stochastic = tensor.dtype() == DType::BF16;
        let working = if stochastic { DType::F32 } else { dtype };
        let at = |t: Tensor<D>| {
            if t.dtype() == working {
                t
            } else {
                t.cast(working)
            }
        };
        let time = state.as_ref().map_or(0, |state| state.momentum.time);
        let state = state.map(|state| map_moments(state, at));
        if !stochastic {
            return self.adamw.step(lr, tensor, grad, state);
        }
        let device = tensor.device();
        device.seed(self.noise_seed(time, &tensor.dims()));
        let (tensor, state) = self.adamw.step(lr, at(tensor), at(grad), state);
        let state = state.map(|state| map_moments(state, round_to_bf16_stochastically));
        (round_to_bf16_stochastically(tensor), state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

/// `state` with `f` applied to each of AdamW's moments.
fn map_moments<const D: usize>(
    mut state: AdamWState<D>,
    f: impl Fn(Tensor<D>) -> Tensor<D>,
) -> AdamWState<D> {
    let m = &mut state.momentum;
    m.moment_1 = f(m.moment_1.clone());
    m.moment_2 = f(m.moment_2.clone());
    m.max_moment_2 = m.max_moment_2.take().map(&f);
    state
}

/// `x` (f32) in bf16, rounded to one of the two bf16 values around it with probabilities that
/// make the result's expectation `x` (the device's random stream draws the choice).
pub fn round_to_bf16_stochastically<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let bf16 = DType::BF16;
    let nearest = x.clone().cast(bf16).cast(DType::F32);
    let error = x - nearest.clone();
    // The bf16 value on the other side of x: nearest moved by 0.6 to 1.2 of its spacing (|v|
    // times 2^-7 is one to two spacings for 8 bits of mantissa), which rounds to exactly the
    // neighbour, also below a power of two where the spacing halves.
    let other = (nearest.clone() + error.clone().sign() * nearest.clone().abs() * (0.6 / 128.0))
        .cast(bf16)
        .cast(DType::F32);
    let gap = (other.clone() - nearest.clone()).abs();
    let chance = error.abs() / gap.clamp_min(f32::MIN_POSITIVE);
    let draw = chance.random_like(Distribution::Default);
    nearest.mask_where(draw.lower(chance), other).cast(bf16)
}

/// [`clip_grad_norm`] without a host read: the norm (before clipping, `[1]`) stays on the
/// device and the clipping factor is taken there, so a training loop can run on without
/// waiting for it (a GPU keeps its queue full). The same rule: scaled by `max / (norm + 1e-6)`
/// when the norm is finite and above `max`.
pub fn clip_grad_norm_on_device<M: Module>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: Option<f64>,
) -> Option<Tensor<1>> {
    let mut visitor = SquaredNorm { grads, total: None };
    model.visit(&mut visitor);
    let norm = visitor.total?.sqrt();
    if let Some(max) = max_norm.filter(|&max| max > 0.0) {
        let clip = norm
            .clone()
            .greater_elem(max)
            .bool_and(norm.clone().is_finite());
        let factor = norm
            .ones_like()
            .mask_where(clip, (norm.clone() + 1e-6).recip() * max);
        let mut visitor = ScaleBy { grads, factor };
        model.visit(&mut visitor);
    }
    Some(norm)
}

struct ScaleBy<'a> {
    grads: &'a mut GradientsParams,
    factor: Tensor<1>,
}

impl ModuleVisitor for ScaleBy<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let factor = self.factor.clone().cast(grad.dtype()).reshape([1; D]);
            self.grads.register(param.id, grad * factor);
        }
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
