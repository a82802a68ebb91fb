//! Global-norm clipping and AdamW's parameter groups on a tiny Llama.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use llama::model::to_host;
use llama::weights::{hf_params, ParamRef};
use trainer::optim::{adamw, clip_grad_norm, grad_norm};
use trainer::recipe::TrainSection;

fn tiny_model() -> llama::Llama {
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    llama::init_random(&config, &Device::flex().autodiff(), 5).unwrap()
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

struct Zeros(GradientsParams);

impl ModuleVisitor for Zeros {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.register(param.id, param.val().zeros_like().inner());
    }
}

#[test]
fn weight_decay_spares_norm_weights() {
    let model = tiny_model();
    let train: TrainSection =
        toml::from_str("batch_size = 1\nlr = 0.1\nweight_decay = 0.5").unwrap();
    let mut optimizer = adamw(&train);
    let mut zeros = Zeros(GradientsParams::new());
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

#[test]
fn a_zero_clip_means_no_clipping() {
    let model = tiny_model();
    let mut grads = some_grads(&model);
    let before = host_grads(&model, &grads);
    clip_grad_norm(&model, &mut grads, Some(0.0));
    assert_eq!(host_grads(&model, &grads), before);
}
