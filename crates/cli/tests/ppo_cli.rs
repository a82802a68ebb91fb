//! `train ppo` end to end: metrics, samples, checkpoints with the value model, exact resume,
//! export to transformers, and its errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use test_support::*;

const RECIPE: &str = "tests/fixtures/recipes/ppo-test.toml";

/// Trains the small reward model the PPO tests use.
fn reward_model(dir: &Path) -> PathBuf {
    let (run, _) = run_recipe(
        "reward",
        "tests/fixtures/recipes/reward-test.toml",
        dir,
        &sets(&["train.max_steps=4"]),
    );
    assert_success(&run);
    dir.join("checkpoint-4")
}

fn ppo(out: &Path, rm: &Path, extra: &[&str]) -> (Output, Vec<serde_json::Value>) {
    let rm = format!("ppo.reward_model=\"{}\"", rm.display());
    let mut args = sets(&[&rm]);
    args.extend_from_slice(extra);
    run_recipe("ppo", RECIPE, out, &args)
}

fn series(metrics: &[serde_json::Value], key: &str) -> Vec<f64> {
    metrics.iter().filter_map(|v| v[key].as_f64()).collect()
}

#[test]
fn ppo_runs_resumes_exactly_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = reward_model(&tmp.path().join("rm"));
    let safety = format!("ppo.safety_reward_model=\"{}\"", rm.display());
    let two_models = sets(&[&safety]);
    let full = tmp.path().join("full");
    let (run, metrics) = ppo(&full, &rm, &two_models);
    assert_success(&run);
    assert_eq!(series(&metrics, "reward_mean").len(), 4);
    for key in [
        "reward_mean",
        "reward_std",
        "helpfulness_score_mean",
        "safety_score_mean",
        "safety_fraction",
        "kl",
        "kl_coef",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "response_length",
        "eos_fraction",
        "rollout_tokens_per_sec",
        "update_tokens_per_sec",
        "generation_s",
        "scoring_s",
        "update_s",
    ] {
        assert_eq!(series(&metrics, key).len(), 4, "{key}");
    }
    // The first iteration samples from the reference itself: zero KL, to rounding (the old
    // log-probabilities come from generation's logits, the reference's from a full pass).
    let kl = series(&metrics, "kl")[0];
    assert!(kl.abs() < 1e-5, "{kl}");
    // Safety prompts (12 of the 40) go to the safety model.
    assert!(series(&metrics, "safety_fraction").iter().any(|&f| f > 0.0));
    let samples = std::fs::read_to_string(full.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 4, "2 samples every 2 iterations");
    let sample: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    for key in [
        "prompt",
        "response",
        "reward",
        "helpfulness_score",
        "safety_score",
    ] {
        assert!(sample.get(key).is_some(), "{key} in {sample}");
    }
    let checkpoint = full.join("checkpoint-4");
    for file in [
        "model.safetensors",
        "optimizer.bpk",
        "value/model.safetensors",
        "value/optimizer.bpk",
    ] {
        assert!(checkpoint.join(file).exists(), "{file}");
    }

    // A damaged value optimizer or KL controller state stops a resume before anything is
    // written; a finished run exits without reading them.
    let damaged = tmp.path().join("damaged");
    copy_tree(&full, &damaged);
    let value_optimizer = damaged.join("checkpoint-4/value/optimizer.bpk");
    std::fs::write(&value_optimizer, b"not an optimizer").unwrap();
    let resume = [&two_models[..], &resume_latest(&[])].concat();
    let (run, _) = ppo(&damaged, &rm, &resume);
    assert_success(&run);
    assert!(stderr(&run).contains("nothing to do"), "{}", stderr(&run));
    std::fs::remove_dir_all(damaged.join("checkpoint-4")).unwrap();
    std::fs::write(damaged.join("checkpoint-2/value/optimizer.bpk"), b"x").unwrap();
    let before = |name: &str| std::fs::read(damaged.join(name)).unwrap();
    let (recipe, metrics_before) = (before("recipe.toml"), before("metrics.jsonl"));
    let (run, _) = ppo(&damaged, &rm, &resume);
    assert_user_error(&run, "optimizer.bpk");
    copy_tree(
        &full.join("checkpoint-2/value"),
        &damaged.join("checkpoint-2/value"),
    );
    edit_json(&damaged.join("checkpoint-2/trainer_state.json"), |state| {
        state["extra"]["kl"] = serde_json::json!("broken")
    });
    let (run, _) = ppo(&damaged, &rm, &resume);
    assert_user_error(&run, "KL controller state");
    assert_eq!(before("recipe.toml"), recipe);
    assert_eq!(before("metrics.jsonl"), metrics_before);

    // Stopped after iteration 2 and resumed: the same numbers afterwards.
    let stopped = tmp.path().join("stopped");
    copy_tree(&full, &stopped);
    std::fs::remove_dir_all(stopped.join("checkpoint-4")).unwrap();
    let (run, resumed) = ppo(
        &stopped,
        &rm,
        &[&two_models[..], &resume_latest(&[])].concat(),
    );
    assert_success(&run);
    for key in ["reward_mean", "kl", "value_loss", "policy_loss"] {
        let (a, b) = (series(&metrics, key), series(&resumed, key));
        assert_eq!(a.len(), b.len(), "{key}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6,
                "{key} at iteration {}: {x} vs {y}",
                i + 1
            );
        }
    }
    let resumed_samples = std::fs::read_to_string(stopped.join("samples.jsonl")).unwrap();
    assert_eq!(samples, resumed_samples);

    // The policy is a language model that generate reads and transformers loads.
    let args = ["--prompt", "Hi", "--max-new-tokens", "3"];
    assert_success(&generate(&checkpoint, &args));
    let exported = tmp.path().join("policy");
    assert_success(&export(&checkpoint, &exported, &[]));
    if let Some(python) = python_with_transformers() {
        assert_python_check(&python, "check_export.py", &[&checkpoint, &exported]);
    }
}

#[test]
fn ppo_bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = reward_model(&tmp.path().join("rm"));
    let out = tmp.path().join("x");

    // A reward model whose tokenizer differs from the policy's.
    let other = tmp.path().join("other-rm");
    copy_tree(&rm, &other);
    edit_json(&other.join("tokenizer.json"), |tok| {
        swap_token_ids(tok, "<unk>", "<s>")
    });
    let (run, _) = ppo(&out, &other, &[]);
    assert_user_error(&run, "tokenizer differs from the policy's");

    // A policy that is not a language model; no reward model at all.
    let (run, _) = ppo(&out, &tmp.path().join("missing"), &[]);
    assert_user_error(&run, "model directory not found");
    let (run, _) = run_recipe(
        "ppo",
        "recipes/reward-tiny.toml",
        &out,
        &sets(&["model.checkpoint=\"x\""]),
    );
    assert_user_error(&run, "no [ppo] section");
    // Prompts longer than the budget are counted and skipped; none left is an error.
    let (run, _) = ppo(
        &out,
        &rm,
        &sets(&["data.max_seq_len=4", "data.truncation=\"drop\""]),
    );
    assert_failed_with(&run, "no prompts");
    assert!(
        stderr(&run).contains("40 dropped at max_seq_len 4"),
        "{}",
        stderr(&run)
    );
    let (run, _) = ppo(&out, &rm, &sets(&["ppo.max_new_tokens=200"]));
    assert_user_error(&run, "exceeds the model's context");
    assert!(!out.exists(), "nothing written before training starts");

    // A KL that explodes stops the run and keeps the last good checkpoint.
    let (run, _) = ppo(
        &out,
        &rm,
        &sets(&[
            // Above the first iteration's rounding-level KL, far below a step at lr 0.05.
            "ppo.max_kl=1e-4",
            "train.save_every=1",
            "train.lr=0.05",
            "train.log_every=100",
        ]),
    );
    assert_user_error(&run, "above ppo.max_kl");
    assert!(out.join("checkpoint-1/model.safetensors").exists());
}

#[test]
fn grpo_runs_without_a_value_model_resumes_exactly_and_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = reward_model(&tmp.path().join("rm"));
    // From the golden checkpoint that transformers loads (context 128), all 16 rollouts of an
    // iteration (4 prompts x 4 answers) in one mini-batch and logged as samples, so the second
    // iteration's logged values can be recomputed from them.
    let golden = golden_dir("tiny-gqa");
    let recipe = recipe_from_checkpoint(RECIPE, &golden, tmp.path());
    let rm_set = format!("ppo.reward_model=\"{}\"", rm.display());
    let base = [
        "ppo.estimator=\"grpo\"",
        "ppo.group_size=4",
        "ppo.kl_coef=0.1",
        "ppo.whiten_reward=false",
        "ppo.ppo_epochs=1",
        "ppo.mini_batch_size=16",
        "ppo.samples=16",
        "ppo.sample_every=1",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.save_every=1",
        "data.max_seq_len=100",
    ];
    let grpo = |out: &Path, extra: &[&str]| {
        let mut overrides: Vec<&str> = base.to_vec();
        overrides.extend_from_slice(extra);
        overrides.push(&rm_set);
        run_recipe("ppo", &recipe, out, &sets(&overrides))
    };
    let full = tmp.path().join("full");
    let (run, metrics) = grpo(&full, &[]);
    assert_success(&run);
    assert_eq!(series(&metrics, "reward_mean").len(), 4);
    assert_eq!(series(&metrics, "value_loss").len(), 0, "no value model");
    // Zero to rounding at the start (see above), then the policy moves.
    let kl = series(&metrics, "kl");
    assert!(kl[0].abs() < 1e-5 && kl[1] > 1e-3, "{kl:?}");
    assert!(!full.join("checkpoint-4/value").exists());
    let samples = read_jsonl(&full.join("samples.jsonl"));
    assert_eq!(samples.len(), 64, "16 rollouts every iteration");
    // A prompt's four answers are consecutive, and a group's advantages sum to zero.
    for group in samples.chunks(4) {
        assert!(group
            .iter()
            .all(|s| s["prompt_ids"] == group[0]["prompt_ids"]));
        let sum: f64 = group.iter().map(|s| s["advantage"].as_f64().unwrap()).sum();
        assert!(sum.abs() < 1e-6, "{sum}");
    }

    // Stopped after iteration 2 and resumed: the same numbers afterwards.
    let stopped = tmp.path().join("stopped");
    copy_tree(&full, &stopped);
    for step in [3, 4] {
        std::fs::remove_dir_all(stopped.join(format!("checkpoint-{step}"))).unwrap();
    }
    let mut overrides: Vec<&str> = base.to_vec();
    overrides.push(&rm_set);
    let (run, resumed) = run_recipe("ppo", &recipe, &stopped, &resume_latest(&overrides));
    assert_success(&run);
    for key in ["reward_mean", "kl", "policy_loss", "grad_norm"] {
        let (a, b) = (series(&metrics, key), series(&resumed, key));
        assert_eq!(a.len(), b.len(), "{key}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "{key}: {x} vs {y}");
        }
    }

    // Iteration 2 recomputed with transformers: rewards, KL, advantages and the policy loss.
    if let Some(python) = python_with_transformers() {
        for (penalty, out) in [("loss", full.clone()), ("reward", tmp.path().join("rloo"))] {
            if penalty == "reward" {
                let (run, _) = grpo(
                    &out,
                    &["ppo.estimator=\"rloo\"", "ppo.kl_penalty=\"reward\""],
                );
                assert_success(&run);
            }
            let estimator = if penalty == "loss" { "grpo" } else { "rloo" };
            let args: Vec<PathBuf> = [
                out.join("checkpoint-1"),
                golden.clone(),
                rm.clone(),
                out.join("samples.jsonl"),
                out.join("metrics.jsonl"),
            ]
            .into_iter()
            .chain(
                [
                    "--iteration",
                    "2",
                    "--group",
                    "4",
                    "--beta",
                    "0.1",
                    "--estimator",
                    estimator,
                    "--kl-penalty",
                    penalty,
                ]
                .map(PathBuf::from),
            )
            .collect();
            let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
            assert_python_check(&python, "check_grpo.py", &refs);
        }
    }
}

#[test]
fn critic_free_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let rm = tmp.path().join("rm-unused");
    for (set, needle) in [
        (vec!["ppo.estimator=\"grpo\""], "group_size"),
        (
            vec!["ppo.estimator=\"rloo\"", "ppo.group_size=1"],
            "group_size",
        ),
        (vec!["ppo.group_size=0"], "group_size"),
        (vec!["ppo.estimator=\"a2c\""], "estimator"),
        (
            vec![
                "ppo.estimator=\"grpo\"",
                "ppo.group_size=2",
                "ppo.value_model=\"v\"",
            ],
            "value_model",
        ),
        (vec!["ppo.kl_penalty=\"both\""], "kl_penalty"),
        (vec!["ppo.group_size=\"four\""], "group_size"),
    ] {
        let (run, _) = ppo(&out, &rm, &sets(&set));
        assert_user_error(&run, needle);
    }
    assert!(!out.exists());
}
