//! LoRA and QLoRA end to end: SFT, reward and PPO train adapters only on a frozen base; their
//! checkpoints are PEFT adapter directories pointing at the base; resume is exact; `train
//! export` merges, `--adapter` writes what peft loads; bad `[lora]` values are refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use test_support::*;

const SFT: &str = "recipes/sft-tiny.toml";

/// A small pretrained base: two steps of sft-tiny.
fn base_model(dir: &Path) -> PathBuf {
    let (run, _) = run_recipe(
        "sft",
        SFT,
        dir,
        &sets(&["train.max_steps=2", "train.eval_every=0"]),
    );
    assert_success(&run);
    dir.join("checkpoint-2")
}

/// `recipe` (with the method section `S`) starting from `base` instead of a fresh model,
/// written into `dir` with its paths resolved.
fn on_base<S: trainer::Section>(recipe: &str, base: &Path, dir: &Path) -> String {
    let (mut resolved, _) = trainer::Recipe::load_with::<S>(&root().join(recipe), &[]).unwrap();
    resolved.model.config = None;
    resolved.model.checkpoint = Some(base.to_path_buf());
    std::fs::create_dir_all(dir).unwrap();
    let name = Path::new(recipe).file_name().unwrap();
    let path = dir.join(name);
    std::fs::write(&path, resolved.to_toml().unwrap()).unwrap();
    path.to_str().unwrap().to_string()
}

/// The `[lora]` settings of these tests and `extra`.
fn lora_sets(extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        "lora.rank=4".to_string(),
        "lora.alpha=8".to_string(),
        r#"lora.targets=["q_proj","v_proj","gate_proj"]"#.to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

fn with_sets(sets: &[String]) -> Vec<&str> {
    sets.iter().flat_map(|s| ["--set", s.as_str()]).collect()
}

/// The Python that has transformers, if it also has peft (a venv made before peft joined
/// requirements-golden.txt lacks it: skipped with a note, or a failure under REQUIRE_TORCH=1).
fn python_with_peft() -> Option<String> {
    let python = python_with_transformers()?;
    let has_peft = std::process::Command::new(&python)
        .args(["-c", "import peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_peft {
        return Some(python);
    }
    assert!(
        std::env::var("REQUIRE_TORCH").as_deref() != Ok("1"),
        "REQUIRE_TORCH=1 but {python} has no peft: run scripts/install-libtorch.sh --golden"
    );
    eprintln!(
        "skipped the peft check: {python} has no peft (scripts/install-libtorch.sh --golden)"
    );
    None
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn lora_sft_learns_resumes_exactly_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(&tmp.path().join("base"));
    let recipe = on_base::<trainer::recipe::NoSection>(SFT, &base, &tmp.path().join("r"));
    let overrides = lora_sets(&[
        "lora.dropout=0.1",
        "train.max_steps=8",
        "train.warmup_steps=1",
        "train.lr=1e-2",
        "train.log_every=1",
        "train.save_every=4",
        "train.eval_every=0",
    ]);
    let full = tmp.path().join("full");
    let (run, metrics) = run_recipe("sft", &recipe, &full, &with_sets(&overrides));
    assert_success(&run);
    let losses: Vec<f64> = losses_by_step(&metrics).iter().map(|(_, l)| *l).collect();
    assert_eq!(losses.len(), 8);
    assert!(
        mean(&losses[6..]) < mean(&losses[..2]),
        "LoRA SFT did not learn: {losses:?}"
    );

    // A bf16 base under f32 adapters (both bf16 modes) follows the f32 run.
    for dtype in ["bf16", "bf16-mixed"] {
        let mut args = overrides.clone();
        args.push(format!("runtime.dtype=\"{dtype}\""));
        let (run, bf16) = run_recipe("sft", &recipe, &tmp.path().join(dtype), &with_sets(&args));
        assert_success(&run);
        let last = losses_by_step(&bf16).last().unwrap().1;
        assert!(
            (last - losses[7]).abs() <= 0.02 * losses[7],
            "{dtype}: {last} against f32 {}",
            losses[7]
        );
    }

    // The checkpoint is a PEFT adapter directory on the base, with the adapters' optimizer.
    let checkpoint = full.join("checkpoint-8");
    assert!(checkpoint.join("adapter_model.safetensors").is_file());
    assert!(!checkpoint.join("model.safetensors").exists());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(
        PathBuf::from(config["base_model_name_or_path"].as_str().unwrap()),
        base.canonicalize().unwrap()
    );
    let size = |p: PathBuf| std::fs::metadata(p).unwrap().len();
    // AdamW holds two moments for the factors only: far less than the base's weights.
    assert!(
        size(checkpoint.join("optimizer.bpk")) * 4 < size(base.join("model.safetensors")),
        "the optimizer state holds more than the adapters"
    );

    // Resuming from step 4 retraces steps 5 to 8 exactly.
    let resumed = tmp.path().join("resumed");
    let from = full.join("checkpoint-4");
    let mut args = with_sets(&overrides);
    args.extend(["--resume", arg(&from)]);
    let (run, resumed_metrics) = run_recipe("sft", &recipe, &resumed, &args);
    assert_success(&run);
    let tail: Vec<(u64, f64)> = losses_by_step(&metrics).into_iter().skip(4).collect();
    assert_eq!(losses_by_step(&resumed_metrics), tail);

    // Generation reads the adapter directory (merged on load) as it reads the merged export.
    let merged = tmp.path().join("merged");
    assert_success(&export(&checkpoint, &merged, &[]));
    assert!(merged.join("model.safetensors").is_file());
    let greedy = [
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ];
    let from_adapter = generate(&checkpoint, &greedy);
    assert_success(&from_adapter);
    let from_merged = generate(&merged, &greedy);
    assert_success(&from_merged);
    assert_eq!(stdout(&from_adapter), stdout(&from_merged));

    // Without [lora], a recipe starting from the adapter directory trains the merged model in
    // full.
    let full_recipe =
        on_base::<trainer::recipe::NoSection>(SFT, &checkpoint, &tmp.path().join("full-r"));
    let (run, metrics) = run_recipe(
        "sft",
        &full_recipe,
        &tmp.path().join("full-from-lora"),
        &sets(&[
            "train.max_steps=3",
            "train.log_every=1",
            "train.eval_every=0",
        ]),
    );
    assert_success(&run);
    let losses: Vec<f64> = losses_by_step(&metrics).iter().map(|(_, l)| *l).collect();
    assert!(losses[0] != losses[2], "nothing trained: {losses:?}");
    assert!(tmp
        .path()
        .join("full-from-lora/checkpoint-3/model.safetensors")
        .is_file());

    let adapter = tmp.path().join("adapter");
    assert_success(&export(&checkpoint, &adapter, &["--adapter"]));
    assert!(adapter.join("adapter_config.json").is_file());
    assert!(adapter.join("tokenizer.json").is_file());
    assert_user_error(
        &export(
            &checkpoint,
            &tmp.path().join("x"),
            &["--adapter", "--dtype", "bf16"],
        ),
        "--dtype applies to merged exports",
    );
    assert_user_error(
        &export(&merged, &tmp.path().join("y"), &["--adapter"]),
        "not a LoRA checkpoint",
    );
    if let Some(python) = python_with_peft() {
        assert_python_check(&python, "check_peft.py", &[&base, &adapter, &merged]);
    }
}

#[test]
fn qlora_sft_learns_on_a_quantized_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(&tmp.path().join("base"));
    let recipe = on_base::<trainer::recipe::NoSection>(SFT, &base, &tmp.path().join("r"));
    for quant in ["q8", "q4"] {
        let quantize = format!("lora.quantize_base=\"{quant}\"");
        // With every layer recomputed in the backward pass (frozen embeddings then take no
        // last gradient).
        let overrides = lora_sets(&[
            &quantize,
            "train.activation_checkpointing=true",
            "train.max_steps=8",
            "train.warmup_steps=1",
            "train.lr=1e-2",
            "train.log_every=1",
            "train.eval_every=0",
        ]);
        let out = tmp.path().join(quant);
        let (run, metrics) = run_recipe("sft", &recipe, &out, &with_sets(&overrides));
        if test_device_name().starts_with("tch") {
            assert_user_error(&run, "quantize_base");
            continue;
        }
        assert_success(&run);
        let losses: Vec<f64> = losses_by_step(&metrics).iter().map(|(_, l)| *l).collect();
        assert!(
            mean(&losses[6..]) < mean(&losses[..2]),
            "QLoRA ({quant}) did not learn: {losses:?}"
        );
        assert!(out.join("checkpoint-8/adapter_model.safetensors").is_file());
    }
    if test_device_name().starts_with("tch") {
        return;
    }
    // Adapters fitted to a 4-bit base do not resume on an 8-bit one.
    let overrides = lora_sets(&[r#"lora.quantize_base="q8""#, "train.max_steps=12"]);
    let mut args = with_sets(&overrides);
    let from = tmp.path().join("q4/checkpoint-8");
    args.extend(["--resume", arg(&from)]);
    let (run, _) = run_recipe("sft", &recipe, &tmp.path().join("q8-resumed"), &args);
    assert_user_error(&run, "trained with lora.quantize_base = \"q4\"");
}

#[test]
fn lora_reward_and_ppo_train_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(&tmp.path().join("base"));
    let reward_recipe = on_base::<reward::RewardSection>(
        "tests/fixtures/recipes/reward-test.toml",
        &base,
        &tmp.path().join("r"),
    );
    let reward_sets = lora_sets(&["train.max_steps=8", "train.lr=1e-2", "train.eval_every=0"]);
    let rm_dir = tmp.path().join("rm");
    let (run, metrics) = run_recipe("reward", &reward_recipe, &rm_dir, &with_sets(&reward_sets));
    assert_success(&run);
    let losses: Vec<f64> = losses_by_step(&metrics).iter().map(|(_, l)| *l).collect();
    assert!(
        mean(&losses[6..]) < mean(&losses[..2]),
        "LoRA reward model did not learn: {losses:?}"
    );
    let rm = rm_dir.join("checkpoint-8");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rm.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["score"]));
    // Merged, it is a plain reward model.
    let merged_rm = tmp.path().join("rm-merged");
    assert_success(&export(&rm, &merged_rm, &[]));
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged_rm.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(merged["architectures"][0], "LlamaForSequenceClassification");
    assert!(merged_rm.join("reward_stats.json").is_file());

    // PPO: the policy and the value model train adapters; the reference is the policy's own
    // base with the adapters left out, so the first iteration's KL is zero to rounding (the old
    // log-probabilities come from generation's logits, the reference's from a full pass).
    let rm_set = format!("ppo.reward_model=\"{}\"", rm.display());
    let ppo_recipe = on_base::<ppo::PpoSection>(
        "tests/fixtures/recipes/ppo-test.toml",
        &base,
        &tmp.path().join("r"),
    );
    let ppo_sets = lora_sets(&[&rm_set, "train.max_steps=2", "train.save_every=2"]);
    let ppo_dir = tmp.path().join("ppo");
    let (run, metrics) = run_recipe("ppo", &ppo_recipe, &ppo_dir, &with_sets(&ppo_sets));
    assert_success(&run);
    let kl: Vec<f64> = metrics.iter().filter_map(|v| v["kl"].as_f64()).collect();
    assert_eq!(kl.len(), 2);
    assert!(kl[0].abs() < 1e-6, "{kl:?}");
    assert!(kl[1] != 0.0, "the adapters did not move the policy: {kl:?}");
    let checkpoint = ppo_dir.join("checkpoint-2");
    assert!(checkpoint.join("adapter_model.safetensors").is_file());
    assert!(checkpoint.join("value/adapter_model.safetensors").is_file());
    assert!(!checkpoint.join("value/model.safetensors").exists());

    // QLoRA: the reference is the packed base itself.
    if !test_device_name().starts_with("tch") {
        let mut q8 = ppo_sets.clone();
        q8.extend([
            "lora.quantize_base=\"q8\"".to_string(),
            "train.max_steps=1".to_string(),
        ]);
        let (run, metrics) = run_recipe(
            "ppo",
            &ppo_recipe,
            &tmp.path().join("ppo-q8"),
            &with_sets(&q8),
        );
        assert_success(&run);
        let kl = metrics.iter().filter_map(|v| v["kl"].as_f64()).next();
        assert!(kl.is_some_and(|kl| kl.abs() < 1e-6), "{kl:?}");
    }
}

#[test]
fn bad_lora_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let recipe = on_base::<trainer::recipe::NoSection>(SFT, &tmp.path().join("none"), tmp.path());
    for (set, needle) in [
        ("lora.rank=0", "`rank` must be >= 1"),
        ("lora.alpha=-1", "`alpha` must be a positive number"),
        ("lora.dropout=1.5", "`dropout` must be within [0, 1)"),
        (r#"lora.targets=["qkv"]"#, "`qkv` is not one of"),
        ("lora.targets=[]", "`targets` must name at least one"),
        (
            r#"lora.targets=["q_proj","q_proj"]"#,
            "names a projection twice",
        ),
        (r#"lora.quantize_base="q3""#, "unknown variant `q3`"),
        ("lora.ranks=4", "unknown field `ranks`"),
    ] {
        let mut overrides = lora_sets(&[]);
        overrides.push(set.to_string());
        let (run, _) = run_recipe("sft", &recipe, &out, &with_sets(&overrides));
        assert_user_error(&run, needle);
        assert!(
            stderr(&run).contains("--set lora."),
            "{set}: {}",
            stderr(&run)
        );
    }
    // LoRA adapts a pretrained model.
    let (run, _) = run_recipe("sft", SFT, &out, &sets(&["lora.rank=4"]));
    assert_user_error(&run, "[lora] adapts a pretrained model");
}
