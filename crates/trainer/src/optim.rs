//! The optimizer, in one place so every trainer (and LoRA later) selects parameters the same
//! way: AdamW with decoupled weight decay on matrices only (norm weights are not decayed), and
//! gradient clipping by the global norm over all parameters, as PyTorch's `clip_grad_norm_`
//! (burn's built-in clipping is per tensor).

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, ModuleOptimizer,
    Optimizer,
};
use burn::prelude::*;
use burn::tensor::{DType, Distribution, TensorData};

use crate::recipe::TrainSection;

/// AdamW as the recipe says; parameters whose path contains "norm" get no weight decay.
pub fn adamw(train: &TrainSection) -> ModuleOptimizer {
    let config = |weight_decay: f64| AdamWSettings {
        beta_1: train.betas[0] as f32,
        beta_2: train.betas[1] as f32,
        epsilon: train.eps as f32,
        weight_decay: weight_decay as f32,
    };
    ModuleOptimizer::from(MomentsAtParamDtype::new(config(train.weight_decay), 0)).with_group(
        ParamGroup::from_predicate("norm"),
        MomentsAtParamDtype::new(config(0.0), 1),
        None,
    )
}

/// AdamW's settings, kept for the fused step (burn's config does not show its fields).
#[derive(Clone, Copy, Debug)]
struct AdamWSettings {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl AdamWSettings {
    fn build(self) -> AdamW {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
            .build()
    }
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
///
/// f32 steps on flex run as one fused pass on the host ([`adamw_on_host`]), bit for bit
/// burn's.
struct MomentsAtParamDtype {
    adamw: AdamW,
    /// The same settings, for the fused step on the host.
    config: AdamWSettings,
    /// Sets the group's noise apart from the other group's.
    group: u64,
    /// The step count of the last parameter stepped and how many have been stepped since.
    place: std::sync::Mutex<(usize, u64)>,
}

impl MomentsAtParamDtype {
    fn new(config: AdamWSettings, group: u64) -> Self {
        Self {
            adamw: config.build(),
            config,
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
        Self::new(self.config, self.group)
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
            if fused_on_host(&tensor, &grad, state.as_ref()) {
                return adamw_on_host(&self.config, lr, tensor, grad, state);
            }
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

/// Whether [`adamw_on_host`] takes this step: f32 on flex, gradient and moments of the
/// parameter's shape (anything else keeps burn's path and its errors). burn's AdamW is some
/// fifteen element-wise passes over each parameter, each allocating, on one core on flex (a
/// tenth of an SFT step); the fused loop reads each number once, on every core. It mirrors
/// AdamW without AMSGrad, which [`AdamWSettings`] never configures.
fn fused_on_host<const D: usize>(
    tensor: &Tensor<D>,
    grad: &Tensor<D>,
    state: Option<&AdamWState<D>>,
) -> bool {
    let f32_like = |t: &Tensor<D>| t.dtype() == DType::F32 && t.shape() == tensor.shape();
    f32_like(tensor)
        && f32_like(grad)
        && state.is_none_or(|s| {
            let m = &s.momentum;
            m.max_moment_2.is_none() && f32_like(&m.moment_1) && f32_like(&m.moment_2)
        })
        && tensor.device().inner() == Device::flex()
}

/// burn's AdamW step (`burn_optim::AdamW`, without AMSGrad) as one pass over the parameter on
/// the host, in the same f32 operations in the same order, so it gives the same bits: the
/// moments `m·β₁ + g·(1-β₁)` and `v·β₂ + g²·(1-β₂)` (`g·(1-β₁)` and `g²·(1-β₂)` at the first
/// step), then `p·(1 - lr·λ) - lr·(m/(1-β₁ᵗ)) / (√(v/(1-β₂ᵗ)) + ε)`. flex hands its buffers
/// over without a copy when a tensor is the only holder of its buffer.
fn adamw_on_host<const D: usize>(
    config: &AdamWSettings,
    lr: f64,
    tensor: Tensor<D>,
    grad: Tensor<D>,
    state: Option<AdamWState<D>>,
) -> (Tensor<D>, Option<AdamWState<D>>) {
    use rayon::prelude::*;
    let device = tensor.device();
    let (beta_1, beta_2) = (config.beta_1, config.beta_2);
    let (factor_1, factor_2) = (1.0 - beta_1, 1.0 - beta_2);
    let (time, moments) = match state {
        Some(state) => (
            state.momentum.time + 1,
            Some((state.momentum.moment_1, state.momentum.moment_2)),
        ),
        None => (1, None),
    };
    let correction_1 = 1f32 - beta_1.powi(time as i32);
    let correction_2 = 1f32 - beta_2.powi(time as i32);
    let epsilon = config.epsilon;
    let decay_rate = lr * config.weight_decay as f64;
    let keep = (1.0 - decay_rate) as f32;
    let lr = lr as f32;

    let mut params = tensor.into_data();
    let grads = grad.into_data();
    let first = moments.is_none();
    let (mut moment_1, mut moment_2) = match moments {
        Some((m, v)) => (m.into_data(), v.into_data()),
        None => (grads.clone(), grads.clone()),
    };
    let slices = (
        params.as_mut_slice::<f32>(),
        grads.as_slice::<f32>(),
        moment_1.as_mut_slice::<f32>(),
        moment_2.as_mut_slice::<f32>(),
    );
    let (Ok(p), Ok(g), Ok(m), Ok(v)) = slices else {
        unreachable!("f32 tensors read back as f32");
    };
    let step = Moments {
        factor_1,
        factor_2,
        beta_1,
        beta_2,
        correction_1,
        correction_2,
        epsilon,
        keep,
        lr,
    };
    let decay = decay_rate != 0.0;
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| match (first, decay) {
            (true, true) => step.apply::<true, true>(p, g, m, v),
            (true, false) => step.apply::<true, false>(p, g, m, v),
            (false, true) => step.apply::<false, true>(p, g, m, v),
            (false, false) => step.apply::<false, false>(p, g, m, v),
        });
    let back = |data: TensorData| Tensor::<D>::from_data(data, &device);
    let state = AdamWState {
        momentum: AdaptiveMomentumState {
            time,
            moment_1: back(moment_1),
            moment_2: back(moment_2),
            max_moment_2: None,
        },
    };
    (back(params), Some(state))
}

/// The numbers of one AdamW step, applied to slices of a parameter.
struct Moments {
    factor_1: f32,
    factor_2: f32,
    beta_1: f32,
    beta_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    keep: f32,
    lr: f32,
}

impl Moments {
    /// The branches are constants and the slices zipped (no bounds checks), so the loop
    /// vectorises.
    fn apply<const FIRST: bool, const DECAY: bool>(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            if FIRST {
                *m = g * self.factor_1;
                *v = (g * g) * self.factor_2;
            } else {
                *m = *m * self.beta_1 + g * self.factor_1;
                *v = *v * self.beta_2 + (g * g) * self.factor_2;
            }
            let delta = (*m / self.correction_1) / ((*v / self.correction_2).sqrt() + self.epsilon);
            let decayed = if DECAY { *p * self.keep } else { *p };
            *p = decayed - delta * self.lr;
        }
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
