//! The reward model's pieces against hand-computed values, padding on both sides, and the
//! Hugging Face `LlamaForSequenceClassification` round trip.

use burn::prelude::*;
use data::batch::PairBatch;
use data::Rating;
use llama::model::to_host;
use llama::{Head, LlamaConfig, SaveOptions, StepInput};
use reward::eval::{PairEval, ScoredPair};
use reward::loss::{pair_loss, pair_margins};
use reward::model::score_sequences;
use reward::{MarginKind, RewardSection};

fn test_device() -> Device {
    let name = test_support::test_device_name();
    llama::parse_device(&name).unwrap_or_else(|e| panic!("LLAMA_TEST_DEVICE: {e}"))
}

fn tiny_config() -> LlamaConfig {
    let mut config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    config.pad_token_id = Some(0);
    config
}

/// A reward model whose head is large enough that scores differ clearly between positions.
fn reward_model(device: &Device) -> llama::Llama {
    let config = tiny_config();
    let mut model = llama::init_random_with_head(&config, device, Head::Score, 7).unwrap();
    let score = model.score.take().unwrap();
    model.score = Some(burn::nn::Linear {
        weight: score.weight.map(|w| w * 500.0),
        bias: None,
    });
    model
}

fn sequences() -> Vec<Vec<u32>> {
    vec![
        vec![1, 40, 41, 42, 43, 44, 45, 2],
        vec![1, 50, 2],
        vec![1, 60, 61, 62, 63, 2],
    ]
}

#[test]
fn scores_are_read_at_the_last_real_token_with_either_padding() {
    let device = test_device();
    let model = reward_model(&device);
    let seqs = sequences();
    let alone: Vec<f64> = seqs
        .iter()
        .map(|s| score_sequences(&model, std::slice::from_ref(s), 1, 0).unwrap()[0])
        .collect();
    // Right padding, with two different pad ids: the pad id must not matter.
    for pad in [0, 7] {
        let right = score_sequences(&model, &seqs, 3, pad).unwrap();
        for (a, b) in alone.iter().zip(&right) {
            assert!(
                (a - b).abs() < 1e-4,
                "right padding (pad {pad}): {a} vs {b}"
            );
        }
    }
    // Left padding.
    let width = seqs.iter().map(Vec::len).max().unwrap();
    let tokens: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| {
            let mut row = vec![0; width - s.len()];
            row.extend(s);
            row
        })
        .collect();
    let valid: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| {
            let mut row = vec![false; width - s.len()];
            row.extend(vec![true; s.len()]);
            row
        })
        .collect();
    let input = StepInput::from_padded(tokens, valid, &[0, 0, 0]);
    let left = to_host(model.last_token_scores(&input));
    for (a, b) in alone.iter().zip(&left) {
        assert!((a - *b as f64).abs() < 1e-4, "left padding: {a} vs {b}");
    }
    // Reading at a pad slot instead would give another number: the check above can fail.
    let hidden = model.hidden_states(
        &StepInput::from_padded(
            vec![vec![1, 50, 2, 0, 0]],
            vec![vec![true, true, true, false, false]],
            &[0],
        ),
        None,
    );
    let at_pad = to_host(model.scalar_outputs(hidden))[4] as f64;
    assert!((at_pad - alone[1]).abs() > 1e-3, "{at_pad} vs {}", alone[1]);
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[test]
fn pair_loss_matches_hand_computed_values() {
    let device = Device::flex();
    // Two pairs: chosen scores 2.0 and 0.5, rejected 1.0 and 1.0.
    let scores = Tensor::<1>::from_floats([2.0, 0.5, 1.0, 1.0], &device);
    let margins = [1.0 / 3.0, 0.0];
    let loss = pair_loss(scores.clone(), &margins, 0.0, 2).into_scalar::<f32>() as f64;
    let expected = -(log_sigmoid(2.0 - 1.0 - 1.0 / 3.0) + log_sigmoid(0.5 - 1.0)) / 2.0;
    assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    // Centering adds coefficient * mean((r_c + r_r)^2).
    let centered = pair_loss(scores.clone(), &margins, 0.01, 2).into_scalar::<f32>() as f64;
    let penalty = 0.01 * ((3.0f64).powi(2) + (1.5f64).powi(2)) / 2.0;
    assert!((centered - expected - penalty).abs() < 1e-6);
    // Divided by the global batch: a micro-batch of 2 pairs in a global batch of 8.
    let part = pair_loss(scores, &margins, 0.0, 8).into_scalar::<f32>() as f64;
    assert!((part - expected * 2.0 / 8.0).abs() < 1e-6);
}

#[test]
fn margins_come_from_the_rating_table_or_the_numeric_margin() {
    let item = |rating: Option<Rating>, margin: Option<f32>| data::batch::PairItem {
        chosen: vec![1, 5, 2],
        rejected: vec![1, 6, 2],
        prompt_len: 1,
        rating,
        margin,
    };
    let batch = PairBatch::new(
        &[
            item(Some(Rating::SignificantlyBetter), None),
            item(Some(Rating::Better), Some(9.0)),
            item(Some(Rating::SlightlyBetter), None),
            item(Some(Rating::NegligiblyBetter), None),
            item(None, Some(0.75)),
            item(None, None),
        ],
        0,
    );
    let with = |margin: MarginKind, table: Option<&[(&str, f64)]>| {
        pair_margins(
            &batch,
            &RewardSection {
                margin,
                margin_table: table.map(|t| t.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
                centering: 0.0,
            },
        )
    };
    let small = with(MarginKind::Small, None);
    let expected_small = [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0, 0.75, 0.0];
    for (got, want) in small.iter().zip(expected_small) {
        assert!((got - want).abs() < 1e-6, "{small:?}");
    }
    assert_eq!(
        with(MarginKind::Large, None),
        vec![3.0, 2.0, 1.0, 0.0, 0.75, 0.0]
    );
    assert_eq!(with(MarginKind::None, None), vec![0.0; 6]);
    let custom = with(
        MarginKind::Custom,
        Some(&[
            ("significantly_better", 5.0),
            ("better", 4.0),
            ("slightly_better", 0.5),
            ("negligibly_better", 0.25),
        ]),
    );
    assert_eq!(custom, vec![5.0, 4.0, 0.5, 0.25, 0.75, 0.0]);
}

#[test]
fn evaluation_reports_accuracy_per_bucket_and_score_statistics() {
    let pair = |chosen: f32, rejected: f32, rating: Option<Rating>| ScoredPair {
        chosen,
        rejected,
        rating,
        margin: 0.0,
    };
    let eval = PairEval::from_scores(&[
        pair(2.0, 1.0, Some(Rating::Better)),
        pair(0.0, 1.0, Some(Rating::Better)),
        pair(3.0, -1.0, None),
        pair(1.0, 1.0, None),
    ]);
    assert_eq!(eval.pairs, 4);
    assert!((eval.accuracy - 0.5).abs() < 1e-12);
    assert!((eval.per_bucket["better"].accuracy - 0.5).abs() < 1e-12);
    assert_eq!(eval.per_bucket["unrated"].pairs, 2);
    assert!((eval.mean_margin - (1.0 - 1.0 + 4.0 + 0.0) / 4.0).abs() < 1e-12);
    let all = [2.0, 1.0, 0.0, 1.0, 3.0, -1.0, 1.0, 1.0];
    let mean = all.iter().sum::<f64>() / 8.0;
    let std = (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
    assert!((eval.reward_mean - mean).abs() < 1e-12);
    assert!((eval.reward_std - std).abs() < 1e-12);
}

#[test]
fn a_language_model_gets_a_fresh_scalar_head_and_the_reward_model_saves_as_a_classifier() {
    let device = test_device();
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let lm = llama::init_random(&config, &device, 3).unwrap();
    let lm_dir = tmp.path().join("lm");
    llama::save_pretrained(&lm, &config, &lm_dir, &SaveOptions::default()).unwrap();

    let (_, rm) = llama::load_pretrained_as(&lm_dir, &device, Head::Score, 0).unwrap();
    assert_eq!(rm.head(), Head::Score);
    // The head starts near zero; the trunk is the language model's.
    let head = to_host(rm.score.as_ref().unwrap().weight.val());
    assert!(head.iter().all(|w| w.abs() < 0.02), "{head:?}");
    assert_eq!(
        to_host(rm.embed_tokens.weight.val()),
        to_host(lm.embed_tokens.weight.val())
    );

    let rm_dir = tmp.path().join("rm");
    llama::save_pretrained(&rm, &config, &rm_dir, &SaveOptions::default()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rm_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(json["num_labels"], 1);
    assert_eq!(json["pad_token_id"], 0);
    // Loaded back as it was saved: a reward model, which cannot be used as a language model.
    let (_, again) = llama::load_pretrained(&rm_dir, &device).unwrap();
    assert_eq!(again.head(), Head::Score);
    let err = llama::load_pretrained_as(&rm_dir, &device, Head::Lm, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("reward model"), "{err}");
    // `train score` refuses a model without a scalar head.
    let err = match reward::RewardModel::load(&lm_dir, &device) {
        Ok(_) => panic!("a language model loaded as a reward model"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not a reward model"), "{err}");
}

#[test]
fn exported_reward_model_scores_identically_in_transformers_and_imports_back() {
    let Some(python) = test_support::python_with_transformers() else {
        return;
    };
    // In transformers 4.57.1 and 5.x; what each saves (5.x: `rope_parameters`, `dtype`) must
    // import back.
    let mut versions = vec![("4", None)];
    if let Some(overlay) = test_support::transformers5_path() {
        versions.push(("5", Some(overlay)));
    }
    let device = test_device();
    let tmp = tempfile::tempdir().unwrap();
    let model = reward_model(&device);
    let dir = tmp.path().join("rm");
    llama::save_pretrained(&model, &tiny_config(), &dir, &SaveOptions::default()).unwrap();
    let seqs = sequences();
    let ids_path = tmp.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&seqs).unwrap()).unwrap();
    let ours = score_sequences(&model, &seqs, 3, 0).unwrap();
    let spread = ours.iter().cloned().fold(f64::MIN, f64::max)
        - ours.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 1e-2, "scores too close to tell apart: {ours:?}");
    for (major, overlay) in versions {
        let hf_saved = tmp.path().join(format!("hf-saved-{major}"));
        let mut command = std::process::Command::new(&python);
        if let Some(overlay) = &overlay {
            command.env("PYTHONPATH", overlay);
        }
        let out = command
            .arg(test_support::root().join("scripts/score_hf.py"))
            .arg(&dir)
            .arg(&ids_path)
            .arg("--save")
            .arg(&hf_saved)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
                .unwrap();
        assert_eq!(report["architecture"], "LlamaForSequenceClassification");
        assert_eq!(report["num_labels"], 1);
        assert!(
            report["transformers"].as_str().unwrap().starts_with(major),
            "{report}"
        );
        let theirs = test_support::json_f64s(&report["scores"]);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() < 1e-4,
                "ours {ours:?} vs transformers {major}: {theirs:?}"
            );
        }
        // What transformers writes, we read back to the same scores.
        let (_, imported) = llama::load_pretrained(&hf_saved, &device).unwrap();
        let again = score_sequences(&imported, &seqs, 3, 0).unwrap();
        for (a, b) in again.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-4, "imported {again:?} vs {theirs:?}");
        }
    }
}

#[test]
fn non_finite_scores_are_an_error() {
    let device = test_device();
    let mut model = reward_model(&device);
    let score = model.score.take().unwrap();
    model.score = Some(burn::nn::Linear {
        weight: score.weight.map(|w| w * f32::NAN),
        bias: None,
    });
    let err = score_sequences(&model, &sequences(), 2, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN or infinite scores"), "{err}");
}
