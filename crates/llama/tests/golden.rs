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
