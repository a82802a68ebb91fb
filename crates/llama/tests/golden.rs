//! The model against Hugging Face `transformers` (golden files made by scripts/make_golden.py):
//! logits to 1e-4 and greedy continuations token for token, with and without the KV cache, and
//! in padded batches (the checks of `llama::reference`, which `train verify` runs elsewhere).

mod common;

use common::*;
use llama::{generate, SamplingParams};
use test_support::{golden_dir, tiny_test_config};

/// Every golden model passes every check `train verify` runs (`llama::reference::verify`):
/// logits within 1e-4 of `transformers`' (full forward, through the KV cache a token at a time,
/// and in a batch mixing left, right and two-sided padding), greedy tokens exactly (alone and
/// batched, with and without the cache), and for the f32 models bf16 and bf16-mixed logits no
/// further off than `transformers`' own bf16 forward pass (4.57.1, CPU) is from its f32 logits.
#[test]
fn golden_models_match_transformers() {
    let device = test_device();
    for name in GOLDEN_MODELS {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        let golden = load_golden(name);
        let checks = llama::reference::verify(&model, &golden).expect("verify");
        let expected = if golden.bf16_tolerance().is_some() {
            6
        } else {
            4
        };
        assert_eq!(checks.len(), expected, "{name}: {checks:?}");
        for check in &checks {
            assert!(check.passed(), "{name}: {check:?}");
            // bf16 is computed in bf16, not f32 in disguise.
            if check.name.starts_with("bf16") {
                assert!(check.measured > 1e-5, "{name}: {check:?}");
            }
        }
    }
    for name in ["tiny-gqa", "tiny-odd"] {
        assert!(load_golden(name).bf16_tolerance().is_some(), "{name}");
    }
}

/// Linear and dynamic RoPE scaling against `transformers` 4.57.1 and 5.x (each fixture made by
/// its version, with its config layout): for linear every check of `train verify`; for dynamic
/// the logits of each sequence alone and greedy generation through the KV cache, the two things
/// it computes the same way as `transformers`. Without the scaling the logits are far off, so
/// the fixtures do exercise it.
#[test]
fn rope_scaled_models_match_transformers() {
    let device = test_device();
    for name in [
        "tiny-rope-linear",
        "golden-tf5/tiny-rope-linear",
        "tiny-rope-dynamic",
        "golden-tf5/tiny-rope-dynamic",
    ] {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        assert!(model.rope.scaling.is_some(), "{name}");
        let golden = load_golden(name);
        let checks = llama::reference::verify(&model, &golden).expect("verify");
        let expected = if name.ends_with("linear") { 4 } else { 2 };
        assert_eq!(checks.len(), expected, "{name}: {checks:?}");
        for check in &checks {
            assert!(check.passed(), "{name}: {check:?}");
        }
        let mut plain = model;
        plain.rope.scaling = None;
        let off = llama::reference::verify(&plain, &golden).expect("verify");
        assert!(off[0].measured > 1e-2, "{name}: {off:?}");
    }
}

/// Models handed to inference keep computing in bf16.
#[test]
fn bf16_compute_survives_valid() {
    use burn::module::Module;
    use burn::tensor::FloatDType;
    let (_, model) = llama::load_pretrained(&golden_dir("tiny-gqa"), &test_device()).expect("load");
    let mixed = llama::Llama {
        compute_dtype: Some(FloatDType::BF16),
        ..model
    };
    assert_eq!(mixed.valid().compute_dtype, Some(FloatDType::BF16));
}

fn greedy_params(max_new_tokens: usize, use_cache: bool) -> SamplingParams {
    SamplingParams {
        max_new_tokens,
        temperature: 0.0,
        eos_token_id: Some(2),
        pad_token_id: 0,
        use_cache,
        ..SamplingParams::default()
    }
}

#[test]
fn sampling_is_reproducible_and_seed_dependent() {
    let device = test_device();
    let (_, model) = llama::load_pretrained(&golden_dir("tiny-gqa"), &device).expect("load");
    let prompts = vec![vec![1, 40, 41, 42], vec![1, 100]];
    let params = |seed| SamplingParams {
        max_new_tokens: 12,
        temperature: 1.5,
        top_p: 0.95,
        seed,
        eos_token_id: None,
        ..SamplingParams::default()
    };
    let a = generate(&model, &prompts, &params(7)).expect("generate");
    let b = generate(&model, &prompts, &params(7)).expect("generate");
    let c = generate(&model, &prompts, &params(8)).expect("generate");
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|g| g.tokens.len() == 12));
}

/// Two examples packed in one row, positions restarting and segments set, compute exactly what
/// each computes alone: no attention crosses the example boundary.
#[test]
fn packed_examples_do_not_attend_to_each_other() {
    let device = test_device();
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let model = llama::init_random(&config, &device, 9).unwrap();
    let first = vec![1u32, 40, 41, 42, 2];
    let second = vec![1u32, 50, 51, 2];
    let alone = model.logits(std::slice::from_ref(&second));
    let mut tokens = first.clone();
    tokens.extend(&second);
    let n = tokens.len();
    let input = llama::StepInput {
        tokens: vec![tokens],
        positions: vec![(0..first.len()).chain(0..second.len()).collect()],
        valid: vec![vec![true; n]],
        segments: Some(vec![[vec![0; first.len()], vec![1; second.len()]].concat()]),
    };
    let packed = model.forward(&input, None);
    let diff = max_abs_diff(
        &rows(&packed, 0, first.len()..n),
        &rows(&alone, 0, 0..second.len()),
    );
    assert!(diff < 1e-4, "packed vs alone: {diff}");
    // Without segments the second example sees the first: the check above can fail.
    let unmasked = llama::StepInput {
        segments: None,
        ..input
    };
    let crossed = max_abs_diff(
        &rows(&model.forward(&unmasked, None), 0, first.len()..n),
        &rows(&alone, 0, 0..second.len()),
    );
    assert!(crossed > 1e-3, "{crossed}");
}

/// The tiny test architecture with small deterministic weights, except those `special` gives.
fn model_with(
    special: impl Fn(&str, usize) -> Option<Vec<f32>>,
    head: llama::Head,
) -> llama::Llama {
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let mut counter = 0.0f32;
    llama::weights::build_llama(
        &config,
        &test_device(),
        head,
        &mut |name, shape| {
            let n: usize = shape.iter().product();
            Ok(special(name, n).unwrap_or_else(|| {
                (0..n)
                    .map(|i| {
                        counter += 1.0;
                        ((i as f32 * 0.37 + counter).sin()) * 0.05
                    })
                    .collect()
            }))
        },
        None,
    )
    .unwrap()
}

#[test]
fn non_finite_logits_stop_generation() {
    let nan_norm = |name: &str, n: usize| (name == "model.norm.weight").then(|| vec![f32::NAN; n]);
    let model = model_with(nan_norm, llama::Head::Lm);
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            temperature,
            ..greedy_params(4, true)
        };
        let err = generate(&model, &[vec![1, 5, 6]], &params).unwrap_err();
        assert!(
            matches!(err, llama::LlamaError::NonFinite("logits")),
            "{err}"
        );
    }
}

#[test]
fn generation_never_picks_ids_past_the_vocab_limit() {
    // Small weights and a high temperature: sampling is near uniform over the 512 ids, so
    // without the limit half of the tokens would be 256 or above.
    let model = model_with(|_, _| None, llama::Head::Lm);
    let params = |limit, temperature| SamplingParams {
        vocab_limit: limit,
        eos_token_id: None,
        temperature,
        seed: 3,
        ..greedy_params(32, true)
    };
    let free = generate(&model, &[vec![1, 5, 6]], &params(None, 50.0)).unwrap();
    assert!(
        free[0].tokens.iter().any(|&t| t >= 256),
        "{:?}",
        free[0].tokens
    );
    for temperature in [0.0, 50.0] {
        let out = generate(
            &model,
            &[vec![1, 5, 6], vec![1, 7]],
            &params(Some(256), temperature),
        )
        .unwrap();
        for row in &out {
            assert_eq!(row.tokens.len(), 32);
            assert!(row.tokens.iter().all(|&t| t < 256), "{:?}", row.tokens);
        }
    }
}

/// `train verify`'s checks pass on the references and catch a small change to any of them.
#[test]
fn verify_passes_on_references_and_catches_changes() {
    let device = test_device();
    let name = "tiny-odd";
    let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
    let golden = load_golden(name);
    let checks = llama::reference::verify(&model, &golden).expect("verify");
    let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "logits",
            "kv_cache",
            "mixed_padding",
            "greedy_tokens",
            "bf16_logits",
            "bf16_mixed_logits"
        ]
    );
    assert!(checks.iter().all(|c| c.passed()), "{checks:?}");

    // Twice the f32 tolerance on one logit of the longest sequence fails the three f32 checks.
    let mut changed = load_golden(name);
    let longest = (0..changed.sequences.len())
        .max_by_key(|&i| changed.sequences[i].len())
        .unwrap();
    changed.logits[longest][7] += 2.0 * llama::reference::F32_TOLERANCE;
    let failed: Vec<&str> = llama::reference::verify(&model, &changed)
        .expect("verify")
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.name)
        .collect();
    assert_eq!(failed, ["logits", "kv_cache", "mixed_padding"]);

    // One greedy token changed: that continuation differs in all four ways of generating it.
    let mut changed = load_golden(name);
    changed.greedy[0].1[0] += 1;
    let checks = llama::reference::verify(&model, &changed).expect("verify");
    let greedy = checks.iter().find(|c| c.name == "greedy_tokens").unwrap();
    assert_eq!(greedy.measured, 4.0);
}

/// `Llama::target_log_probs` (the softmax outside the autodiff graph, the gradient through a
/// surrogate term) gives what the plain log-softmax of the logits gives: the values, and the
/// gradients of a weighted sum of them for the hidden states and for every weight of the head,
/// tied and untied, at a temperature and with the vocabulary cut, with and without autodiff.
#[test]
fn target_log_probs_match_the_log_softmax_of_the_logits() {
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use burn::prelude::*;
    use burn::tensor::{Distribution, TensorData};
    use llama::model::{to_host, token_log_probs};

    let device = test_device();
    let ad = device.clone().autodiff();
    let (rows, time) = (3, 5);
    for (tied, temperature, limit) in [(true, 1.0, usize::MAX), (false, 0.7, 300)] {
        let mut config = llama::load_config(&tiny_test_config()).unwrap();
        config.tie_word_embeddings = tied;
        let model = llama::init_random(&config, &ad, 11).unwrap();
        let dim = config.hidden_size;
        let targets: Vec<i64> = (0..rows * time)
            .map(|i| (i as i64 * 37 + 5) % 300)
            .collect();
        let weights = Tensor::<2>::random([rows, time], Distribution::Uniform(-1.0, 1.0), &ad);
        let hidden = Tensor::<3>::random([rows, time, dim], Distribution::Normal(0.0, 3.0), &ad)
            .require_grad();
        let plain = token_log_probs(
            model.lm_logits(hidden.clone()),
            targets.clone(),
            temperature,
            limit,
        )
        .0;
        let fast = model.target_log_probs(hidden.clone(), targets.clone(), temperature, limit);
        let (plain_values, fast_values) = (to_host(plain.clone()), to_host(fast.clone()));
        for (a, b) in plain_values.iter().zip(&fast_values) {
            assert!((a - b).abs() < 1e-4, "tied {tied}: {a} vs {b}");
        }
        let grads_of = |x: Tensor<2>| {
            let mut grads = (x * weights.clone()).sum().backward();
            let d_hidden = to_host(hidden.grad(&grads).expect("hidden has a gradient"));
            let params = GradientsParams::from_module(&mut grads, &model);
            let head = match &model.lm_head {
                Some(head) => params.get::<2>(head.weight.id),
                None => params.get::<2>(model.embed_tokens.weight.id),
            };
            (d_hidden, to_host(head.expect("the head has a gradient")))
        };
        let (plain_hidden, plain_head) = grads_of(plain);
        let (fast_hidden, fast_head) = grads_of(fast);
        for (what, a, b) in [
            ("hidden", &plain_hidden, &fast_hidden),
            ("head", &plain_head, &fast_head),
        ] {
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "tied {tied}, {what}: {diff} of {scale}"
            );
        }
        // Without autodiff: the values alone.
        let frozen = model.valid();
        let inner = Tensor::<3>::from_data(
            TensorData::new(to_host(hidden.clone()), [rows, time, dim]),
            &device.clone().inner(),
        );
        let values = to_host(frozen.target_log_probs(inner, targets, temperature, limit));
        for (a, b) in plain_values.iter().zip(&values) {
            assert!((a - b).abs() < 1e-4, "tied {tied}, no autodiff: {a} vs {b}");
        }
    }
}

/// `llama::model::attend` under autodiff (the softmax outside the graph, its gradient through
/// a zero-valued term) gives burn's attention: the output, and the gradients of a weighted sum
/// of it for the queries, keys and values, with a mask that hides padding, other segments and
/// the future, each row keeping at least one key. (Without autodiff it is burn's attention,
/// which the golden checks against `transformers` cover.)
#[test]
fn attention_with_the_softmax_outside_the_graph_matches_burns() {
    use burn::prelude::*;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Distribution, TensorData};
    use llama::model::{attend, to_host};

    let device = test_device();
    let ad = device.clone().autodiff();
    let [batch, heads, time, dim] = [2, 3, 7, 4];
    let scale = 0.4;
    // Row 0: causal over all keys; row 1: two packed segments, the first key is padding.
    let mut masked = Vec::new();
    for b in 0..batch {
        for q in 0..time {
            for k in 0..time {
                let hidden = k > q || (b == 1 && (k == 0 || (k < 3) != (q < 3)));
                masked.push(hidden && !(b == 1 && q == 0 && k == 0));
            }
        }
    }
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(masked, [batch, 1, time, time]), &ad);
    let random = |seed: f64| {
        Tensor::<4>::random(
            [batch, heads, time, dim],
            Distribution::Normal(seed, 2.0),
            &ad,
        )
        .require_grad()
    };
    let (q, k, v) = (random(0.0), random(0.5), random(-0.5));
    let weights = Tensor::<4>::random([batch, heads, time, dim], Distribution::Default, &ad);
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: false,
    };
    let burns = attention(
        q.clone(),
        k.clone(),
        v.clone(),
        Some(mask.clone()),
        None,
        options,
    );
    let ours = attend(q.clone(), k.clone(), v.clone(), mask.clone(), scale);
    let close = |what: &str, a: Vec<f32>, b: Vec<f32>| {
        let size = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            size > 0.0 && diff <= 1e-5 * size,
            "{what}: {diff} of {size}"
        );
    };
    close("output", to_host(burns.clone()), to_host(ours.clone()));
    let grads_of = |out: Tensor<4>| {
        let grads = (out * weights.clone()).sum().backward();
        [&q, &k, &v].map(|x| to_host(x.grad(&grads).expect("an input has a gradient")))
    };
    for ((name, a), b) in ["queries", "keys", "values"]
        .into_iter()
        .zip(grads_of(burns))
        .zip(grads_of(ours))
    {
        close(name, a, b);
    }
}

/// Each generated token's log-probability and entropy, taken from the logits it was sampled
/// from (KV cache, left-padded batch), equal the log-softmax and entropy of a full forward pass
/// over prompt and answer: what PPO's old log-probabilities were before they came from here.
#[test]
fn generation_reports_the_log_probability_of_each_sampled_token() {
    use burn::tensor::activation::log_softmax;
    use llama::model::to_host;

    let device = test_device();
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let model = llama::init_random(&config, &device, 5).unwrap();
    let prompts = vec![vec![1, 40, 41, 42, 43], vec![1, 7]];
    let (temperature, limit) = (0.8f32, 400usize);
    let params = SamplingParams {
        max_new_tokens: 6,
        temperature,
        top_p: 0.9,
        seed: 3,
        eos_token_id: None,
        vocab_limit: Some(limit),
        ..SamplingParams::default()
    };
    let generated = generate(&model, &prompts, &params).unwrap();
    for (prompt, g) in prompts.iter().zip(&generated) {
        assert_eq!(g.tokens.len(), 6);
        assert_eq!((g.logprobs.len(), g.entropies.len()), (6, 6));
        let mut sequence = prompt.clone();
        sequence.extend(&g.tokens);
        let logits = model.logits(&[sequence.clone()]);
        let [_, time, _] = logits.dims();
        let scaled = logits.slice([0..1, 0..time, 0..limit]) / temperature as f64;
        let log_probs = to_host(log_softmax(scaled, 2));
        for (i, &token) in g.tokens.iter().enumerate() {
            let row = &log_probs[(prompt.len() - 1 + i) * limit..][..limit];
            let entropy: f64 = -row
                .iter()
                .map(|&l| (l as f64).exp() * l as f64)
                .sum::<f64>();
            let logprob = row[token as usize] as f64;
            assert!(
                (g.logprobs[i] - logprob).abs() < 1e-4,
                "{} vs {logprob}",
                g.logprobs[i]
            );
            assert!(
                (g.entropies[i] - entropy).abs() < 1e-4,
                "{} vs {entropy}",
                g.entropies[i]
            );
        }
    }
}
