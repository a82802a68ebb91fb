//! `scripts/gpu-check.sh --dry-run`: every step of the GPU check, on flex with tiny shapes, so
//! the script that runs on a lent GPU machine cannot rot between the sessions that have one.
//! Also `train verify`, which the check runs first.

mod common;

use common::*;
use test_support::{python_with_transformers, root, test_device_name};

#[test]
fn gpu_check_dry_run_passes_every_step() {
    if test_device_name().starts_with("tch") {
        eprintln!("skipped: the dry run is on flex, already checked in the flex round");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(root().join("scripts/gpu-check.sh"))
        .args(["--dry-run", "--bin", env!("CARGO_BIN_EXE_train"), "--out"])
        .arg(tmp.path())
        .output()
        .expect("python3 runs scripts/gpu_check.py");
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{text}\n{}", stderr(&run));
    let report: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
    assert_eq!(report["passed"], true);
    let steps = report["steps"].as_object().unwrap();
    let names: Vec<&str> = steps.keys().map(String::as_str).collect();
    for step in [
        "verify",
        "tiny_recipes",
        "bench_sft_7b_lora",
        "bench_sft_7b_full",
        "bench_sft_1b",
        "bench_generate",
        "bench_ppo_1b",
    ] {
        assert!(names.contains(&step), "{step} missing from {names:?}");
        assert_eq!(steps[step]["passed"], true, "{step}: {}", steps[step]);
    }
    // Every golden model, every check, passed on flex.
    let models = steps["verify"]["models"].as_array().unwrap();
    assert_eq!(models.len(), 6);
    for model in models {
        let checks = model["checks"].as_object().unwrap();
        assert!(checks.len() >= 4, "{model}");
        assert!(checks.values().all(|c| c["passed"] == true), "{model}");
    }
    let tiny = &steps["tiny_recipes"];
    assert!(tiny["sft"]["last_loss"].as_f64() < tiny["sft"]["first_loss"].as_f64());
    let lora = &steps["bench_sft_7b_lora"];
    assert_eq!(lora["lora"], true);
    assert!(lora["trained_parameters"].as_u64() < lora["parameters"].as_u64());
    assert!(lora["memory_plan_total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(steps["bench_generate"]["runs"].as_array().unwrap().len(), 2);
}

#[test]
fn verify_fails_in_one_line_on_a_wrong_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-gqa");
    test_support::copy_tree(&test_support::golden_dir("tiny-gqa"), &model);
    // Another model's reference outputs: same vocabulary, other logits and continuations.
    for file in ["golden.json", "golden.safetensors"] {
        std::fs::copy(
            test_support::golden_dir("tiny-odd").join(file),
            model.join(file),
        )
        .map(|_| ())
        .unwrap_or_else(|_| panic!("copy {file}"));
    }
    let device = test_device_name();
    let run = train(&["verify", "--device", &device, "--model", arg(&model)]);
    if run.status.success() {
        panic!(
            "verify passed against another model's references: {}",
            stdout(&run)
        );
    }
    assert_user_error(&run, "check(s) failed");
    // A reference token outside the vocabulary: refused, not a panic in the embedding.
    let path = model.join("golden.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["sequences"][0][1] = serde_json::json!(99_999);
    std::fs::write(&path, json.to_string()).unwrap();
    let run = train(&["verify", "--model", arg(&model)]);
    assert_user_error(&run, "outside the vocabulary");
    // No reference files: one line naming the file.
    std::fs::remove_file(model.join("golden.json")).unwrap();
    let run = train(&["verify", "--model", arg(&model)]);
    assert_user_error(&run, "golden.json");
}

/// The GPU check's PyTorch peer, on CPU with tiny shapes: every run reports its figures.
#[test]
fn pytorch_peer_runs_its_shapes() {
    if test_device_name().starts_with("tch") {
        eprintln!("skipped: not a backend test; run in the flex round");
        return;
    }
    let Some(python) = python_with_transformers() else {
        return;
    };
    let run = std::process::Command::new(python)
        .arg(root().join("scripts/gpu_peer_torch.py"))
        .args(["--dry-run", "--json"])
        .output()
        .expect("python runs");
    assert!(run.status.success(), "{}", stderr(&run));
    let report: serde_json::Value =
        serde_json::from_str(stdout(&run).trim()).expect("one JSON object");
    let sft = report["sft"].as_array().unwrap();
    assert_eq!(sft.len(), 3);
    for run in sft {
        assert!(run["tokens_per_sec"].as_f64().unwrap() > 0.0, "{run}");
    }
    // LoRA trains far fewer parameters than full fine-tuning of the same shape.
    assert!(sft[0]["trained_parameters"].as_u64() < sft[1]["trained_parameters"].as_u64());
    assert_eq!(report["generate"].as_array().unwrap().len(), 2);
}
