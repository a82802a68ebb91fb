//! Global-norm clipping and AdamW's parameter groups on a tiny Llama.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use llama::model::to_host;
use llama::weights::{hf_params, ParamRef};
use trainer::optim::{
    adamw, clip_grad_norm, clip_grad_norm_on_device, grad_norm, round_to_bf16_stochastically,
};
use trainer::recipe::TrainSection;

fn tiny_model() -> llama::Llama {
    tiny_model_on(&Device::flex())
}

fn tiny_model_on(device: &Device) -> llama::Llama {
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    llama::init_random(&config, &device.clone().autodiff(), 5).unwrap()
}

/// LLAMA_TEST_DEVICE (flex by default): the bf16 tests run on each backend of the suite.
fn test_device() -> Device {
    let name = test_support::test_device_name();
    llama::parse_device(&name).unwrap_or_else(|e| panic!("LLAMA_TEST_DEVICE: {e}"))
}

fn host_grads(model: &llama::Llama, grads: &GradientsParams) -> Vec<f32> {
    hf_params(model)
        .into_iter()
        .flat_map(|(_, p)| match p {
            ParamRef::Linear(l) => to_host(grads.get::<2>(l.weight.id).unwrap()),
            ParamRef::Norm(n) => to_host(grads.get::<1>(n.gamma.id).unwrap()),
            ParamRef::Embedding(e) => to_host(grads.get::<2>(e.weight.id).unwrap()),
        })
        .collect()
}

fn some_grads(model: &llama::Llama) -> GradientsParams {
    let logits = model.logits(&[vec![1, 20, 30, 40, 50]]);
    let loss = logits.square().mean();
    GradientsParams::from_grads(loss.backward(), model)
}

#[test]
fn global_norm_clipping_scales_every_gradient_together() {
    let model = tiny_model();
    let mut grads = some_grads(&model);
    let before = host_grads(&model, &grads);
    let expected = before
        .iter()
        .map(|g| (*g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = grad_norm(&model, &grads);
    assert!(
        (norm - expected).abs() <= 1e-5 * expected,
        "{norm} vs {expected}"
    );

    let reported = clip_grad_norm(&model, &mut grads, Some(norm / 4.0));
    assert_eq!(reported, norm, "the pre-clip norm is reported");
    let after = host_grads(&model, &grads);
    let clipped = grad_norm(&model, &grads);
    assert!((clipped - norm / 4.0).abs() <= 1e-4 * norm, "{clipped}");
    // One factor for all tensors: the direction is unchanged.
    for (a, b) in before.iter().zip(&after) {
        assert!(
            (a / 4.0 - b).abs() <= 1e-5 * a.abs().max(1e-3),
            "{a} -> {b}"
        );
    }
    // Under the limit nothing changes: the norm reported and every gradient.
    let untouched = clip_grad_norm(&model, &mut grads, Some(norm));
    assert!((untouched - norm / 4.0).abs() <= 1e-4 * norm);
    assert_eq!(host_grads(&model, &grads), after);
}

/// Clipping on the device gives the norm and the gradients that clipping on the host gives,
/// above and below the limit, and leaves non-finite gradients alone as it does.
#[test]
fn clipping_on_the_device_matches_clipping_on_the_host() {
    let model = tiny_model();
    let norm = grad_norm(&model, &some_grads(&model));
    for limit in [Some(norm / 3.0), Some(norm * 2.0), None] {
        let (mut host, mut device) = (some_grads(&model), some_grads(&model));
        let host_norm = clip_grad_norm(&model, &mut host, limit);
        let device_norm = clip_grad_norm_on_device(&model, &mut device, limit)
            .expect("a model with gradients has a norm")
            .into_scalar::<f32>() as f64;
        assert!((host_norm - device_norm).abs() <= 1e-6 * norm, "{limit:?}");
        for (a, b) in host_grads(&model, &host)
            .iter()
            .zip(&host_grads(&model, &device))
        {
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1e-3),
                "{limit:?}: {a} vs {b}"
            );
        }
    }
    let mut infinite = Filled(GradientsParams::new(), f32::INFINITY);
    model.visit(&mut infinite);
    let mut grads = infinite.0;
    let reported = clip_grad_norm_on_device(&model, &mut grads, Some(1.0)).unwrap();
    assert!(reported.into_scalar::<f32>().is_infinite());
    assert!(host_grads(&model, &grads).iter().all(|g| g.is_infinite()));
}

/// Gradients of one value for every parameter.
struct Filled(GradientsParams, f32);

impl ModuleVisitor for Filled {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = param.val().full_like(self.1).inner();
        self.0.register(param.id, grad);
    }
}

#[test]
fn weight_decay_spares_norm_weights() {
    let model = tiny_model();
    let train: TrainSection =
        toml::from_str("batch_size = 1\nlr = 0.1\nweight_decay = 0.5").unwrap();
    let mut optimizer = adamw(&train);
    let mut zeros = Filled(GradientsParams::new(), 0.0);
    model.visit(&mut zeros);
    let before: Vec<(String, Vec<f32>)> = hf_params(&model)
        .into_iter()
        .map(|(n, p)| (n, p.to_host()))
        .collect();
    let model = optimizer.step(0.1, model, zeros.0);
    for ((name, old), (_, param)) in before.iter().zip(hf_params(&model)) {
        let new = param.to_host();
        let factor = if name.contains("norm") {
            1.0
        } else {
            1.0 - 0.1 * 0.5
        };
        for (a, b) in old.iter().zip(&new) {
            assert!(
                (a * factor - b).abs() <= 1e-6,
                "{name}: {a} -> {b}, expected factor {factor}"
            );
        }
    }
}

/// On flex, AdamW runs as one fused pass on the host; it gives the bits burn's AdamW gives
/// (the same groups: norm weights without decay), over several steps with changing gradients,
/// whose later steps depend on the moments, and leaves state of the same layout behind.
#[test]
fn the_fused_adamw_step_gives_burns_bits() {
    use burn::module::ParamGroup;
    use burn::optim::{AdamWConfig, ModuleOptimizer};

    let train: TrainSection = toml::from_str(
        "batch_size = 1\nlr = 0.01\nweight_decay = 0.1\nbetas = [0.9, 0.95]\neps = 1e-6",
    )
    .unwrap();
    let burns_config = |decay: f32| {
        AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_epsilon(1e-6)
            .with_weight_decay(decay)
            .build()
    };
    let mut burns = ModuleOptimizer::from(burns_config(0.1)).with_group(
        ParamGroup::from_predicate("norm"),
        burns_config(0.0),
        None,
    );
    let mut fused = adamw(&train);
    let (mut a, mut b) = (tiny_model(), tiny_model());
    let params = |m: &llama::Llama| -> Vec<f32> {
        hf_params(m)
            .into_iter()
            .flat_map(|(_, p)| p.to_host())
            .collect()
    };
    assert_eq!(params(&a), params(&b));
    for step in 0..3 {
        // Different gradients each step; the same for both models (their parameters agree).
        let grads_a = some_grads(&a);
        let grads_b = some_grads(&b);
        assert_eq!(host_grads(&a, &grads_a), host_grads(&b, &grads_b));
        let lr = 0.01 / (step + 1) as f64;
        a = burns.step(lr, a, grads_a);
        b = fused.step(lr, b, grads_b);
        let (pa, pb) = (params(&a), params(&b));
        let first_change = pa
            .iter()
            .zip(&pb)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert_eq!(first_change, None, "step {step}");
    }
    // The same tensors and scalars in the record a checkpoint saves (its Debug counts them).
    let state = |optimizer: &ModuleOptimizer| format!("{:?}", optimizer.to_record());
    assert_eq!(state(&burns), state(&fused));
}

#[test]
fn a_zero_clip_means_no_clipping() {
    let model = tiny_model();
    let mut grads = some_grads(&model);
    let before = host_grads(&model, &grads);
    clip_grad_norm(&model, &mut grads, Some(0.0));
    assert_eq!(host_grads(&model, &grads), before);
}

#[test]
fn stochastic_rounding_picks_a_neighbour_with_the_right_odds() {
    let device = test_device();
    device.seed(7);
    let n = 20_000;
    // Each value with the bf16 neighbours around it: above 1 the spacing is 2^-7, below it
    // 2^-8; exact values, zero and negatives too.
    let cases: [(f32, [f32; 2]); 6] = [
        (1.001, [1.0, 1.0078125]),
        (0.999, [0.99609375, 1.0]),
        (-1.001, [-1.0078125, -1.0]),
        (3.0e-5, [2.9921532e-5, 3.0040741e-5]),
        (0.5, [0.5, 0.5]),
        (0.0, [0.0, 0.0]),
    ];
    for (x, [low, high]) in cases {
        let rounded = round_to_bf16_stochastically(Tensor::<1>::full([n], x, &device));
        assert_eq!(rounded.dtype(), DType::BF16);
        let values = to_host(rounded);
        assert!(
            values.iter().all(|&v| v == low || v == high),
            "{x}: {:?}",
            values.iter().find(|&&v| v != low && v != high)
        );
        // Unbiased: the mean is x, within four standard errors of the two-point draw.
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let p = if high > low {
            (x - low) as f64 / (high - low) as f64
        } else {
            0.0
        };
        let error = (high - low) as f64 * (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (mean - x as f64).abs() <= 4.0 * error + 1e-12,
            "{x}: mean {mean}, standard error {error}"
        );
    }
}

#[test]
fn bf16_parameters_keep_updates_smaller_than_their_rounding_step() {
    // A norm weight of 1.0 in bf16 moves in steps of 2^-8 below 1: AdamW at lr 1e-4 moves it
    // 1e-4 a step, which round-to-nearest drops every time. Stochastic rounding keeps it in
    // expectation: after 100 steps the weights average 0.99.
    let model = llama::model::cast_weights(
        tiny_model_on(&test_device()),
        burn::tensor::FloatDType::BF16,
    );
    let train: TrainSection =
        toml::from_str("batch_size = 1\nlr = 1e-4\nweight_decay = 0.0").unwrap();
    let mut optimizer = adamw(&train);
    let mut model = model;
    for _ in 0..100 {
        let mut ones = Filled(GradientsParams::new(), 1.0);
        model.visit(&mut ones);
        model = optimizer.step(1e-4, model, ones.0);
    }
    assert_eq!(model.norm.gamma.val().dtype(), DType::BF16);
    let gammas: Vec<f32> = hf_params(&model)
        .into_iter()
        .filter(|(name, _)| name.contains("norm"))
        .flat_map(|(_, p)| p.to_host())
        .collect();
    let mean = gammas.iter().map(|&g| g as f64).sum::<f64>() / gammas.len() as f64;
    assert!(
        (mean - 0.99).abs() <= 2e-3,
        "mean norm weight {mean} after 100 steps"
    );
}
