//! The preference losses against hand-computed values and finite differences, and the
//! gradients `train dpo` takes (log-probabilities read first, then one backward pass of the
//! weighted sum, through the chunked head and recomputed layers) against autodiff of the loss
//! written out in tensors.

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::TensorData;
use data::batch::IGNORE;
use data::{load_source, LengthPolicy, OnError, SourceConfig, Tokenized, Tokenizer, Truncation};
use dpo::logps::{dpo_dataset, logps_and_grads, sequence_logps, DpoBatch, DpoItem};
use dpo::train::loss_weights;
use dpo::{pair_loss, DpoLoss, DpoSection};
use llama::model::to_host;
use llama::weights::hf_params;
use trainer::chunked::GradPlan;

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance * b.abs().max(1.0)
}

#[test]
fn losses_and_derivatives_match_hand_computed_values() {
    // β = 0.1; h = (π_c - ρ_c) - (π_r - ρ_r) = (-10 + 11) - (-12 + 11) = 2, βh = 0.2.
    // log σ(0.2) = -0.598138869, log σ(-0.2) = -0.798138869, σ(-0.2) = 0.450166003.
    let (policy, reference) = ([-10.0, -12.0], [-11.0, -11.0]);
    let cases = [
        // DPO: -log σ(0.2); dL/dh = -β σ(-0.2).
        (DpoLoss::Sigmoid, 0.0, 0.598_138_869, -0.045_016_600),
        // cDPO, ε = 0.1: 0.9 * 0.598138869 + 0.1 * 0.798138869; -0.1 * (0.9 σ(-0.2) - 0.1 σ(0.2)).
        (DpoLoss::Sigmoid, 0.1, 0.618_138_869, -0.035_016_600),
        // Robust, ε = 0.1: (0.9 * 0.598138869 - 0.1 * 0.798138869) / 0.8;
        // -0.1 * (0.9 σ(-0.2) + 0.1 σ(0.2)) / 0.8.
        (DpoLoss::Robust, 0.1, 0.573_138_869, -0.057_516_600),
    ];
    for (kind, eps, loss, d_h) in cases {
        let got = pair_loss(kind, 0.1, eps, policy, reference);
        assert!(close(got.loss, loss, 1e-8), "{kind:?} {eps}: {got:?}");
        assert!(close(got.d_chosen, d_h, 1e-7), "{kind:?} {eps}: {got:?}");
        assert_eq!(got.d_rejected, -got.d_chosen);
    }
    // IPO on averages: h = (-1.0 + 1.1) - (-1.2 + 1.1) = 0.2; (0.2 - 1/(2 * 0.1))² = 23.04,
    // dL/dh = 2 (0.2 - 5) = -9.6.
    let ipo = pair_loss(DpoLoss::Ipo, 0.1, 0.0, [-1.0, -1.2], [-1.1, -1.1]);
    assert!(close(ipo.loss, 23.04, 1e-10), "{ipo:?}");
    assert!(close(ipo.d_chosen, -9.6, 1e-10), "{ipo:?}");
}

#[test]
fn at_the_reference_the_sigmoid_loss_is_log_2_and_pushes_the_chosen_answer_up() {
    for beta in [0.05, 0.1, 0.5] {
        let got = pair_loss(DpoLoss::Sigmoid, beta, 0.0, [-7.0, -3.0], [-7.0, -3.0]);
        assert!(close(got.loss, std::f64::consts::LN_2, 1e-12), "{got:?}");
        // Gradient descent moves against the derivative: up the chosen answer, down the
        // rejected one, at rate β/2.
        assert!(close(got.d_chosen, -beta / 2.0, 1e-12), "{got:?}");
        assert!(close(got.d_rejected, beta / 2.0, 1e-12), "{got:?}");
    }
}

#[test]
fn derivatives_match_finite_differences() {
    let h = 1e-5;
    for kind in [DpoLoss::Sigmoid, DpoLoss::Robust, DpoLoss::Ipo] {
        let eps = if kind == DpoLoss::Ipo { 0.0 } else { 0.2 };
        for (policy, reference) in [
            ([-3.0, -4.0], [-3.5, -3.2]),
            ([-40.0, -10.0], [-35.0, -12.0]),
            ([-0.5, -0.9], [-0.7, -0.6]),
        ] {
            let at = |p: [f64; 2]| pair_loss(kind, 0.3, eps, p, reference).loss;
            let got = pair_loss(kind, 0.3, eps, policy, reference);
            let numeric_c =
                (at([policy[0] + h, policy[1]]) - at([policy[0] - h, policy[1]])) / (2.0 * h);
            let numeric_r =
                (at([policy[0], policy[1] + h]) - at([policy[0], policy[1] - h])) / (2.0 * h);
            assert!(
                close(got.d_chosen, numeric_c, 1e-6),
                "{kind:?}: {got:?} vs {numeric_c}"
            );
            assert!(
                close(got.d_rejected, numeric_r, 1e-6),
                "{kind:?}: {got:?} vs {numeric_r}"
            );
        }
    }
}

#[test]
fn large_margins_stay_finite() {
    for h in [-1e4, 1e4] {
        for kind in [DpoLoss::Sigmoid, DpoLoss::Robust] {
            let got = pair_loss(kind, 1.0, 0.1, [h, 0.0], [0.0, 0.0]);
            assert!(
                got.loss.is_finite() && got.d_chosen.is_finite(),
                "{kind:?} {h}: {got:?}"
            );
        }
    }
}

/// Four pairs of the repo's preference data.
fn four_pairs() -> Vec<DpoItem> {
    let tokenizer = Tokenizer::from_file(&test_support::fixture_tokenizer_path()).unwrap();
    let source = SourceConfig::file(
        test_support::root().join("datasets/preference-tiny.json"),
        None,
    );
    let policy = LengthPolicy {
        max_seq_len: 96,
        truncation: Truncation::TruncatePrompt,
        train_on_inputs: false,
    };
    let (items, _) = load_source(&source, &tokenizer, &policy, OnError::Stop).unwrap();
    let examples: Vec<Tokenized> = items.into_iter().take(4).map(|i| i.tokens).collect();
    let dataset = dpo_dataset(&examples);
    (0..4)
        .map(|i| data::batch::Dataset::get(&dataset, i).unwrap())
        .collect()
}

fn grads_by_name(model: &llama::Llama, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    hf_params(model)
        .into_iter()
        .map(|(name, param)| {
            let values = match param {
                llama::weights::ParamRef::Linear(l) => grads.get::<2>(l.weight.id).map(to_host),
                llama::weights::ParamRef::Norm(n) => grads.get::<1>(n.gamma.id).map(to_host),
                llama::weights::ParamRef::Embedding(e) => grads.get::<2>(e.weight.id).map(to_host),
            };
            (name, values.expect("every parameter has a gradient"))
        })
        .collect()
}

/// The mean loss over the batch's pairs written out in tensors, for autodiff to differentiate.
fn tensor_loss(
    model: &llama::Llama,
    batch: &DpoBatch,
    reference: &[f64],
    s: &DpoSection,
) -> Tensor<1> {
    let device = model.device();
    let targets = &batch.sequences.targets;
    let (rows, width) = (targets.len(), targets[0].len());
    let ids: Vec<i64> = targets
        .iter()
        .flatten()
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let mask: Vec<f32> = targets
        .iter()
        .flatten()
        .map(|&t| f32::from(u8::from(t != IGNORE)))
        .collect();
    // The head's log-probabilities as training takes them (`target_log_probs`, itself tested
    // against the plain log-softmax in crates/llama/tests/golden.rs): what is checked here is
    // the weighted backward pass, chunking and recomputation around it. DPO's gradient is a
    // difference of chosen and rejected terms that nearly cancel, which magnifies the rounding
    // of two different log-softmax formulations past this test's tolerance.
    let hidden = model.hidden_states(&batch.input(), None);
    let picked = model.target_log_probs(hidden, ids, 1.0, usize::MAX);
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, width]), &device);
    let mut sums = (picked * mask).sum_dim(1).reshape([rows]);
    let mut reference: Vec<f32> = reference.iter().map(|&v| v as f32).collect();
    if s.loss == DpoLoss::Ipo {
        let tokens: Vec<f32> = batch.tokens.iter().map(|&n| n as f32).collect();
        for (r, n) in reference.iter_mut().zip(&tokens) {
            *r /= n;
        }
        sums = sums / Tensor::<1>::from_data(TensorData::new(tokens, [rows]), &device);
    }
    let reference = Tensor::<1>::from_data(TensorData::new(reference, [rows]), &device);
    let ratios = sums - reference;
    let n = batch.pairs;
    let h = ratios.clone().narrow(0, 0, n) - ratios.narrow(0, n, n);
    let eps = s.label_smoothing;
    let x = h.clone() * s.beta;
    let losses = match s.loss {
        DpoLoss::Sigmoid => log_sigmoid(x.clone()) * (eps - 1.0) - log_sigmoid(x.neg()) * eps,
        DpoLoss::Robust => {
            (log_sigmoid(x.clone()) * (eps - 1.0) + log_sigmoid(x.neg()) * eps) / (1.0 - 2.0 * eps)
        }
        DpoLoss::Ipo => (h - 1.0 / (2.0 * s.beta)).square(),
    };
    losses.mean()
}

#[test]
fn weighted_backward_gives_the_gradients_of_the_loss() {
    let device = llama::parse_device(&test_support::test_device_name())
        .unwrap()
        .autodiff();
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    let model = llama::init_random(&config, &device, 5).unwrap();
    let batch = DpoBatch::new(&four_pairs(), 0);
    // A reference a little away from the policy, so that h is not 0.
    let reference: Vec<f64> = sequence_logps(&model.valid(), &batch, 0)
        .iter()
        .enumerate()
        .map(|(i, v)| v + 0.7 * (i as f64 - 3.5))
        .collect();
    let width = batch.sequences.tokens[0].len();
    let sections = [
        DpoSection {
            beta: 0.1,
            ..DpoSection::default()
        },
        DpoSection {
            beta: 0.5,
            label_smoothing: 0.2,
            ..DpoSection::default()
        },
        DpoSection {
            beta: 0.3,
            loss: DpoLoss::Robust,
            label_smoothing: 0.1,
            ..DpoSection::default()
        },
        DpoSection {
            beta: 0.1,
            loss: DpoLoss::Ipo,
            ..DpoSection::default()
        },
    ];
    for s in &sections {
        let loss = tensor_loss(&model, &batch, &reference, s);
        let expected = grads_by_name(
            &model,
            &GradientsParams::from_grads(loss.backward(), &model),
        );
        for (chunk, layerwise) in [(0, false), (width / 3, false), (7, true)] {
            let plan = GradPlan {
                chunk,
                layerwise,
                ..GradPlan::default()
            };
            let (logps, grads) = logps_and_grads(&model, &batch, plan, |policy| {
                loss_weights(s, &batch, policy, &reference, batch.pairs)
            });
            assert_eq!(logps.len(), 2 * batch.pairs);
            for ((name, a), (_, b)) in grads_by_name(&model, &grads).iter().zip(&expected) {
                let scale = b.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-6);
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff <= 1e-3 * scale + 1e-7,
                    "{:?} chunk {chunk} layerwise {layerwise} {name}: differ by {diff} (scale {scale})",
                    s.loss
                );
            }
        }
    }
}
