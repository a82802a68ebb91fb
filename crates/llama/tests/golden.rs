//! The model against Hugging Face `transformers` (golden files made by scripts/make_golden.py):
//! logits to 1e-4 and greedy continuations token for token, with and without the KV cache, and
//! in padded batches.

mod common;

use common::*;
use llama::{generate, KvCache, SamplingParams, StepInput};
use test_support::{golden_dir, tiny_test_config};

const TOLERANCE: f32 = 1e-4;

#[test]
fn logits_match_transformers() {
    let device = test_device();
    for name in GOLDEN_MODELS {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        let golden = load_golden(name);
        for (seq, expected) in golden.sequences.iter().zip(&golden.logits) {
            let logits = model.logits(std::slice::from_ref(seq));
            let diff = max_abs_diff(&rows(&logits, 0, 0..seq.len()), expected);
            assert!(diff <= TOLERANCE, "{name}: max abs diff {diff} on {seq:?}");
        }
    }
}

#[test]
fn bf16_and_mixed_logits_stay_near_transformers() {
    use burn::tensor::FloatDType;
    let device = test_device();
    // Tolerances: how far transformers' own bf16 forward pass is from its f32 logits.
    for name in ["tiny-gqa", "tiny-odd"] {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        let golden = load_golden(name);
        let tolerance = golden.bf16_tolerance().expect("a measured bf16 tolerance");
        let bf16 = llama::model::cast_weights(model.clone(), FloatDType::BF16);
        let mixed = llama::Llama {
            compute_dtype: Some(FloatDType::BF16),
            ..model
        };
        // Models handed to inference keep computing in bf16.
        use burn::module::Module;
        assert_eq!(mixed.valid().compute_dtype, Some(FloatDType::BF16));
        for (label, model) in [("bf16", bf16), ("bf16-mixed", mixed)] {
            for (seq, expected) in golden.sequences.iter().zip(&golden.logits) {
                let logits = model.logits(std::slice::from_ref(seq));
                let diff = max_abs_diff(&rows(&logits, 0, 0..seq.len()), expected);
                // Computed in bf16 (not f32 in disguise), and close.
                assert!(diff > 1e-5 && diff <= tolerance, "{name} {label}: {diff}");
            }
        }
    }
}

#[test]
fn kv_cache_reproduces_full_forward() {
    let device = test_device();
    for name in GOLDEN_MODELS {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        let golden = load_golden(name);
        let seq = &golden.sequences[1];
        let vocab = model.vocab_size();
        // A prefix of 3 tokens, then one token at a time through the cache.
        let mut cache = KvCache::new();
        let mut got = Vec::new();
        let mut start = 0;
        for chunk in [&seq[..3]].into_iter().chain(seq[3..].chunks(1)) {
            let input = StepInput::from_padded(
                vec![chunk.to_vec()],
                vec![vec![true; chunk.len()]],
                &[start],
            );
            let logits = model.forward(&input, Some(&mut cache));
            got.extend(rows(&logits, 0, 0..chunk.len()));
            start += chunk.len();
        }
        assert_eq!(cache.len(), seq.len());
        assert_eq!(got.len(), seq.len() * vocab);
        let diff = max_abs_diff(&got, &golden.logits[1]);
        assert!(diff <= TOLERANCE, "{name}: cached logits differ by {diff}");
    }
}

#[test]
fn padded_batch_matches_unpadded_logits() {
    let device = test_device();
    for name in GOLDEN_MODELS {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        let golden = load_golden(name);
        let width = golden.sequences.iter().map(Vec::len).max().unwrap() + 2;
        // Row 0 left-padded, row 1 right-padded, row 2 padded on both sides.
        let mut tokens = Vec::new();
        let mut valid = Vec::new();
        let mut offsets = Vec::new();
        for (i, seq) in golden.sequences.iter().enumerate() {
            let free = width - seq.len();
            let left = match i {
                0 => free,
                1 => 0,
                _ => free / 2,
            };
            let mut row = vec![0u32; left];
            row.extend(seq);
            row.resize(width, 0);
            let mut mask = vec![false; left];
            mask.extend(vec![true; seq.len()]);
            mask.resize(width, false);
            tokens.push(row);
            valid.push(mask);
            offsets.push(left);
        }
        let input = StepInput::from_padded(tokens, valid, &[0, 0, 0]);
        let logits = model.forward(&input, None);
        for (i, seq) in golden.sequences.iter().enumerate() {
            let got = rows(&logits, i, offsets[i]..offsets[i] + seq.len());
            let diff = max_abs_diff(&got, &golden.logits[i]);
            assert!(
                diff <= TOLERANCE,
                "{name} row {i}: padded logits differ by {diff}"
            );
        }
    }
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
fn greedy_generation_matches_transformers() {
    let device = test_device();
    for name in GOLDEN_MODELS {
        let (_, model) = llama::load_pretrained(&golden_dir(name), &device).expect("load");
        let golden = load_golden(name);
        for use_cache in [true, false] {
            let params = greedy_params(golden.max_new_tokens, use_cache);
            for (prompt, expected) in &golden.greedy {
                let out =
                    generate(&model, std::slice::from_ref(prompt), &params).expect("generate");
                assert_eq!(&out[0].tokens, expected, "{name} cache={use_cache} alone");
                assert_eq!(out[0].stopped_at_eos, expected.last() == Some(&2));
            }
            // All prompts in one left-padded batch give the same tokens as alone.
            let prompts: Vec<Vec<u32>> = golden.greedy.iter().map(|g| g.0.clone()).collect();
            let out = generate(&model, &prompts, &params).expect("generate");
            for ((_, expected), got) in golden.greedy.iter().zip(&out) {
                assert_eq!(&got.tokens, expected, "{name} cache={use_cache} batched");
            }
        }
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
