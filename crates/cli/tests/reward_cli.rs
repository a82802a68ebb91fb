//! `train reward`, `train score` and reward-model export end to end.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use test_support::*;

const RECIPE: &str = "tests/fixtures/recipes/reward-test.toml";

fn reward(out: &Path, extra: &[&str]) -> (Output, Vec<serde_json::Value>) {
    run_recipe("reward", RECIPE, out, extra)
}

#[test]
fn reward_trains_resumes_exactly_scores_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let (run, metrics) = reward(&full, &[]);
    let summary = json_summary(&run);
    assert_eq!(summary["steps"], 8);
    let train_lines: Vec<_> = metrics.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(train_lines.len(), 8);
    for key in ["accuracy", "lr", "grad_norm", "pairs_per_sec"] {
        assert!(train_lines[0].get(key).is_some(), "{key} missing");
    }
    let evals: Vec<_> = metrics
        .iter()
        .filter(|v| v.get("eval_accuracy").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    for key in ["eval_mean_margin", "eval_reward_mean", "eval_reward_std"] {
        assert!(evals[1].get(key).is_some(), "{key} missing");
    }
    // The checkpoint carries the eval split's score statistics for PPO.
    let checkpoint = full.join("checkpoint-8");
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("reward_stats.json")).unwrap(),
    )
    .unwrap();
    let eval = &summary["eval"];
    assert_eq!(stats["mean"], eval["reward_mean"]);
    assert_eq!(stats["std"], eval["reward_std"]);

    // Stopped after step 4 and resumed: the same losses afterwards.
    let stopped = tmp.path().join("stopped");
    copy_tree(&full, &stopped);
    std::fs::remove_dir_all(stopped.join("checkpoint-8")).unwrap();
    let (run, resumed) = reward(&stopped, &resume_latest(&[]));
    assert_success(&run);
    let a = losses_by_step(&metrics);
    let b = losses_by_step(&resumed);
    assert_eq!(a.len(), b.len());
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6, "step {step}: {x} vs {y}");
    }

    // `train score` on pairs reproduces the trainer's evaluation of the same model; here on
    // every pair of the preference file, with buckets for each rating level.
    let pairs = Path::new("datasets/preference-tiny.json");
    let scored = json_summary(&score(&checkpoint, pairs, &["--json"]));
    assert_eq!(scored["pairs"], 40);
    let accuracy = scored["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    for bucket in [
        "significantly better",
        "better",
        "slightly better",
        "unrated",
    ] {
        assert!(
            scored["per_bucket"][bucket]["pairs"].as_u64().unwrap() > 0,
            "{bucket}: {scored}"
        );
    }
    // The overall accuracy is the pair-weighted mean of the buckets', which all add up to 40.
    let buckets = scored["per_bucket"].as_object().unwrap();
    let total: u64 = buckets.values().map(|b| b["pairs"].as_u64().unwrap()).sum();
    assert_eq!(total, 40);
    let weighted: f64 = buckets
        .values()
        .map(|b| b["accuracy"].as_f64().unwrap() * b["pairs"].as_f64().unwrap())
        .sum::<f64>()
        / 40.0;
    assert!(
        (weighted - accuracy).abs() < 1e-9,
        "{weighted} vs {accuracy}"
    );
    // Single records: one score each, in file order, equal to scoring them one at a time.
    let singles = Path::new("tests/fixtures/score-records.jsonl");
    let records = json_summary(&score(&checkpoint, singles, &["--json"]));
    let batched = json_f64s(&records["scores"]);
    assert_eq!(batched.len(), 3);
    let one_by_one = json_summary(&score(
        &checkpoint,
        singles,
        &["--batch-size", "1", "--json"],
    ));
    for (a, b) in batched.iter().zip(json_f64s(&one_by_one["scores"])) {
        assert!((a - b).abs() < 1e-4);
    }

    // Export keeps the classifier and its statistics.
    let exported = tmp.path().join("exported");
    assert_success(&export(&checkpoint, &exported, &[]));
    assert!(exported.join("reward_stats.json").exists());
    let config = std::fs::read_to_string(exported.join("config.json")).unwrap();
    assert!(config.contains("LlamaForSequenceClassification"));
    assert!(!exported.join("optimizer.bpk").exists());
}

#[test]
fn reward_and_score_bad_input_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    // SFT data has no pairs.
    let (run, _) = reward(
        &out,
        &[
            "--set",
            "data.sources=[{path = \"../../../datasets/alpaca-tiny.jsonl\"}]",
        ],
    );
    assert_user_error(&run, "no preference pairs");
    let (run, _) = reward(&out, &sets(&["reward.margin=\"custom\""]));
    assert_user_error(&run, "needs a `margin_table`");
    let (run, _) = reward(
        &out,
        &sets(&[
            "reward.margin=\"custom\"",
            "reward.margin_table={much_better = 2.0}",
        ]),
    );
    assert_user_error(&run, "unknown rating `much_better`");
    let (run, _) = reward(&out, &sets(&["reward.margins=1"]));
    assert_user_error(&run, "margins");
    assert!(!out.exists(), "nothing written before training starts");

    // A pair with a rating outside the known levels names the file, line and field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"rating\": \"much better\"}\n",
    )
    .unwrap();
    let run = score(&golden_dir("tiny-gqa"), &bad, &[]);
    // The golden model is a language model: refused before the data is read.
    assert_user_error(&run, "not a reward model");

    // A reward model for the remaining checks.
    let (run, _) = reward(&out, &sets(&["train.max_steps=1"]));
    assert_success(&run);
    let rm = out.join("checkpoint-1");
    let run = score(&rm, &bad, &[]);
    assert_user_error(&run, "unknown rating `much better`");
    assert!(stderr(&run).contains("bad.jsonl:1"), "{}", stderr(&run));
    let same = tmp.path().join("same.jsonl");
    std::fs::write(
        &same,
        "{\"prompt\": \"a\", \"chosen\": \"same\", \"rejected\": \"same\"}\n",
    )
    .unwrap();
    assert_user_error(&score(&rm, &same, &[]), "identical to `chosen`");
    let prompts = root().join("datasets/prompts-tiny.jsonl");
    assert_user_error(&score(&rm, &prompts, &[]), "need a `response`");
    // The reward model cannot generate.
    assert_user_error(&generate(&rm, &["--prompt", "Hi"]), "reward model");
}

/// The README's real-data result: a tiny reward model trained on 90% of the HH-RLHF harmless
/// pairs beats chance clearly on the other 10%.
#[test]
fn hh_rlhf_harmless_reward_model_beats_chance() {
    let Some(shared) = shared_dir() else {
        return;
    };
    assert!(shared
        .join("data/hh-rlhf/harmless-base-test.jsonl.gz")
        .exists());
    let tmp = tempfile::tempdir().unwrap();
    let (run, metrics) = run_recipe(
        "reward",
        "recipes/reward-hh-harmless-tiny.toml",
        &tmp.path().join("hh"),
        &[],
    );
    let summary = json_summary(&run);
    let eval = &summary["eval"];
    assert_eq!(eval["pairs"], 231, "a 90/10 split of 2,312 pairs");
    let accuracy = eval["accuracy"].as_f64().unwrap();
    eprintln!("HH-RLHF harmless held-out accuracy: {accuracy:.4}");
    // Chance is 0.5 with a standard error of 0.033 on 231 pairs.
    assert!(accuracy >= 0.57, "accuracy {accuracy}");
    assert!(metrics.iter().any(|v| v.get("eval_accuracy").is_some()));
}
