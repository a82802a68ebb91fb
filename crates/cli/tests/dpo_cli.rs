//! `train dpo` end to end: it learns the tiny preference data, resumes exactly (with the
//! reference's log-probabilities kept with the run), exports a `LlamaForCausalLM`, matches
//! transformers and the published formulas, and refuses bad input in one line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use test_support::*;

const RECIPE: &str = "tests/fixtures/recipes/dpo-test.toml";

fn dpo(out: &Path, extra: &[&str]) -> (Output, Vec<serde_json::Value>) {
    run_recipe("dpo", RECIPE, out, extra)
}

/// `key` of the training lines (those with a `loss` and `rewards/chosen`), in step order.
fn train_series(metrics: &[serde_json::Value], key: &str) -> Vec<f64> {
    metrics
        .iter()
        .filter(|v| v.get("loss").is_some() && v.get("rewards/chosen").is_some())
        .filter_map(|v| v[key].as_f64())
        .collect()
}

fn assert_close_series(a: &[f64], b: &[f64], tolerance: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tolerance,
            "{what} at step {}: {x} vs {y}",
            i + 1
        );
    }
}

/// `train export` of a DPO checkpoint is a `LlamaForCausalLM` directory with the checkpoint's
/// logits in transformers (when it is installed).
fn assert_exports_a_causal_lm(checkpoint: &Path, exported: &Path) {
    assert_success(&export(checkpoint, exported, &[]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    if let Some(python) = python_with_transformers() {
        assert_python_check(&python, "check_export.py", &[checkpoint, exported]);
    }
}

#[test]
fn dpo_learns_resumes_exactly_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let overrides = ["train.max_steps=16", "dpo.precompute_reference=true"];
    let precompute = sets(&overrides);
    let (run, metrics) = dpo(&full, &precompute);
    assert_success(&run);
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "pairs_per_sec",
    ] {
        assert_eq!(train_series(&metrics, key).len(), 16, "{key}");
    }
    let evals: Vec<&serde_json::Value> = metrics
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 4, "eval every 4 steps");
    for key in [
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_logps/chosen",
    ] {
        assert!(evals[0][key].is_number(), "{key} in {}", evals[0]);
    }
    // The policy starts as the reference: the loss is log 2 and the rewards 0.
    let losses = train_series(&metrics, "loss");
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-5,
        "{losses:?}"
    );
    assert!(train_series(&metrics, "rewards/margins")[0].abs() < 1e-4);
    // It learns the training pairs: the last epoch (4 steps of 8 of the 32 pairs), measured
    // before each step, ranks the chosen answer higher in nearly all.
    let accuracies = train_series(&metrics, "rewards/accuracies");
    let last_epoch = accuracies[12..].iter().sum::<f64>() / 4.0;
    assert!(last_epoch > 0.9, "{accuracies:?}");
    assert!(losses[12..].iter().all(|&l| l < 0.5), "{losses:?}");
    let checkpoint = full.join("checkpoint-16");
    assert!(checkpoint.join("reference_logps.json").is_file());
    assert!(full.join("reference_logps.json").is_file());

    // Stopped after step 8 and resumed: the same numbers afterwards, with the reference read
    // back from the checkpoint.
    let stopped = tmp.path().join("stopped");
    copy_tree(&full, &stopped);
    for step in [12, 16] {
        std::fs::remove_dir_all(stopped.join(format!("checkpoint-{step}"))).unwrap();
    }
    let (run, resumed) = dpo(&stopped, &resume_latest(&overrides));
    assert_success(&run);
    for key in ["loss", "rewards/margins", "logps/chosen", "grad_norm"] {
        let (a, b) = (train_series(&metrics, key), train_series(&resumed, key));
        assert_close_series(&a, &b, 1e-6, key);
    }
    // A damaged copy of the reference's values stops a resume before anything is written.
    let damaged = tmp.path().join("damaged");
    copy_tree(&stopped, &damaged);
    std::fs::remove_dir_all(damaged.join("checkpoint-16")).unwrap();
    let saved = damaged.join("checkpoint-12/reference_logps.json");
    edit_json(&saved, |v| v["train"] = serde_json::json!([[0.0, 0.0]]));
    let metrics_before = std::fs::read(damaged.join("metrics.jsonl")).unwrap();
    let (run, _) = dpo(&damaged, &resume_latest(&overrides));
    assert_user_error(&run, "reference_logps.json");
    assert_eq!(
        std::fs::read(damaged.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
    // So does other data with as many pairs (answers cut shorter), found by the fingerprint.
    let other = tmp.path().join("other-data");
    copy_tree(&full, &other);
    std::fs::remove_dir_all(other.join("checkpoint-16")).unwrap();
    let shorter = [&overrides[..], &["data.max_seq_len=120"]].concat();
    let (run, _) = dpo(&other, &resume_latest(&shorter));
    assert_failed_with(&run, "computed for other pairs");

    // The reference held in memory instead gives the same run.
    let held = tmp.path().join("held");
    let (run, held_metrics) = dpo(&held, &sets(&["train.max_steps=4"]));
    assert_success(&run);
    let first = |m: &[serde_json::Value]| train_series(m, "loss")[..4].to_vec();
    assert_close_series(&first(&metrics), &first(&held_metrics), 1e-5, "loss");

    // The policy exports as a plain language model.
    assert_exports_a_causal_lm(&checkpoint, &tmp.path().join("policy"));
}

#[test]
fn every_loss_learns_and_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    // The recipe from the golden checkpoint that transformers loads.
    let golden = golden_dir("tiny-gqa");
    let recipe = recipe_from_checkpoint(RECIPE, &golden, tmp.path());
    let recipe = recipe.as_str();
    let base = ["data.max_seq_len=128", "data.eval_fraction=0.0"];
    // All the pairs in one batch, so the logged means do not depend on their order.
    let ids = tmp.path().join("ids.jsonl");
    let inspect = train(
        &[
            &[
                "data",
                "inspect",
                "--recipe",
                RECIPE,
                "--json",
                "--ids",
                arg(&ids),
            ][..],
            &sets(&base),
        ]
        .concat(),
    );
    let pairs = json_output(&inspect)["train"].as_u64().unwrap();
    let batch = format!("train.batch_size={pairs}");
    for (loss, smoothing, beta) in [
        ("sigmoid", "0.1", "0.1"),
        ("ipo", "0.0", "0.5"),
        ("robust", "0.2", "0.2"),
    ] {
        let out = tmp.path().join(loss);
        let settings = [
            format!("dpo.loss=\"{loss}\""),
            format!("dpo.label_smoothing={smoothing}"),
            format!("dpo.beta={beta}"),
        ];
        let mut extra: Vec<&str> = base.to_vec();
        extra.extend([
            batch.as_str(),
            "train.micro_batch_size=8",
            "train.max_steps=6",
            "train.save_every=1",
            "train.keep_last=10",
        ]);
        extra.extend(settings.iter().map(String::as_str));
        let (run, metrics) = run_recipe("dpo", recipe, &out, &sets(&extra));
        assert_success(&run);
        let losses = train_series(&metrics, "loss");
        assert!(losses[5] < losses[0], "{loss}: {losses:?}");
        if let Some(python) = python_with_transformers() {
            let owned: Vec<PathBuf> = [
                out.join("checkpoint-1"),
                golden.clone(),
                ids.clone(),
                out.join("metrics.jsonl"),
            ]
            .into_iter()
            .chain(
                [
                    "--step",
                    "2",
                    "--beta",
                    beta,
                    "--loss",
                    loss,
                    "--label-smoothing",
                    smoothing,
                ]
                .map(PathBuf::from),
            )
            .collect();
            let refs: Vec<&Path> = owned.iter().map(PathBuf::as_path).collect();
            assert_python_check(&python, "check_dpo.py", &refs);
        }
    }
}

#[test]
fn dpo_bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for (set, needle) in [
        ("dpo.beta=0", "beta"),
        ("dpo.beta=-1.0", "beta"),
        ("dpo.beta=\"high\"", "beta"),
        ("dpo.loss=\"hinge\"", "loss"),
        ("dpo.label_smoothing=0.5", "label_smoothing"),
        ("dpo.precompute_reference=3", "precompute_reference"),
        ("dpo.temperature=1.0", "temperature"),
    ] {
        let (run, _) = dpo(&out, &sets(&[set]));
        assert_user_error(&run, needle);
    }
    let (run, _) = dpo(
        &out,
        &sets(&["dpo.loss=\"ipo\"", "dpo.label_smoothing=0.1"]),
    );
    assert_user_error(&run, "label_smoothing");

    // A reference whose tokenizer differs from the policy's, named by its file.
    let reference = tmp.path().join("reference");
    copy_tree(&golden_dir("tiny-gqa"), &reference);
    edit_json(&reference.join("tokenizer.json"), |tok| {
        swap_token_ids(tok, "<unk>", "<s>")
    });
    let set = format!("dpo.reference=\"{}\"", reference.display());
    let (run, _) = dpo(&out, &sets(&[&set]));
    assert_user_error(&run, "tokenizer.json");
    // One whose vocabulary differs from its config's claim (no tokenizer of its own to compare):
    // the file and the tensor are named.
    let vocab = tmp.path().join("other-vocab");
    copy_tree(&golden_dir("tiny-gqa"), &vocab);
    std::fs::remove_file(vocab.join("tokenizer.json")).unwrap();
    edit_json(&vocab.join("config.json"), |c| c["vocab_size"] = 520.into());
    let set_vocab = format!("dpo.reference=\"{}\"", vocab.display());
    let (run, _) = dpo(&out, &sets(&[&set_vocab]));
    assert_user_error(&run, "model.embed_tokens.weight");
    // One whose context is shorter than the sequences (128 against 256).
    copy_tree(&golden_dir("tiny-gqa"), &reference);
    let (run, _) = dpo(&out, &sets(&[&set]));
    assert_user_error(&run, "context");
    // A reference that is not there.
    let set = format!("dpo.reference=\"{}\"", tmp.path().join("missing").display());
    let (run, _) = dpo(&out, &sets(&[&set]));
    assert!(!run.status.success());
    assert!(!stderr(&run).contains("panicked"), "{}", stderr(&run));
    // Data without pairs.
    let (run, _) = dpo(
        &out,
        &sets(&["data.sources=[{path=\"../../../datasets/prompts-tiny.jsonl\"}]"]),
    );
    assert_user_error(&run, "preference pairs");
    assert!(
        !out.join("metrics.jsonl").exists(),
        "nothing written by a refused run"
    );
}

#[test]
fn dpo_with_lora_uses_the_base_as_reference_resumes_and_exports_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = golden_dir("tiny-gqa");
    let recipe = recipe_from_checkpoint(RECIPE, &golden, tmp.path());
    let overrides = [
        "data.max_seq_len=128",
        "lora.rank=4",
        "train.lr=1e-2",
        "dpo.precompute_reference=true",
    ];
    let full = tmp.path().join("full");
    let (run, metrics) = run_recipe("dpo", &recipe, &full, &sets(&overrides));
    assert_success(&run);
    // Fresh adapters change nothing: the base without them is the reference, loss log 2.
    let losses = train_series(&metrics, "loss");
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-5,
        "{losses:?}"
    );
    assert!(
        losses[4..].iter().sum::<f64>() < losses[..4].iter().sum::<f64>(),
        "{losses:?}"
    );
    let checkpoint = full.join("checkpoint-8");
    assert!(checkpoint.join("adapter_model.safetensors").is_file());
    assert!(checkpoint.join("reference_logps.json").is_file());

    let stopped = tmp.path().join("stopped");
    copy_tree(&full, &stopped);
    std::fs::remove_dir_all(stopped.join("checkpoint-8")).unwrap();
    let (run, resumed) = run_recipe("dpo", &recipe, &stopped, &resume_latest(&overrides));
    assert_success(&run);
    let (a, b) = (
        train_series(&metrics, "loss"),
        train_series(&resumed, "loss"),
    );
    assert_close_series(&a, &b, 1e-6, "loss");

    assert_exports_a_causal_lm(&checkpoint, &tmp.path().join("merged"));
}
