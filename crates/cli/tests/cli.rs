//! The `train` binary end to end: info, generate and export, and its errors for bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use test_support::*;

#[test]
fn info_gives_exact_llama2_parameter_counts() {
    for (file, expected) in [
        ("configs/llama2-7b.toml", 6_738_415_616u64),
        ("configs/llama2-13b.toml", 13_015_864_320),
        ("configs/llama2-70b.toml", 68_976_648_192),
    ] {
        let v = json_output(&train(&["info", "--config", file, "--json"]));
        assert_eq!(v["parameters"].as_u64(), Some(expected), "{file}");
        let f32_total = v["full_finetune_memory_bytes"]["f32"]["total"]
            .as_u64()
            .unwrap();
        assert_eq!(f32_total, expected * 16);
    }
    let out = train(&["info", "--config", "configs/tiny-15m.toml"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("parameters"));
}

#[test]
fn info_plans_the_memory_of_a_recipe_for_its_command() {
    let params = |config: &str| {
        json_output(&train(&["info", "--config", config, "--json"]))["parameters"]
            .as_u64()
            .unwrap()
    };
    let plan = |args: &[&str]| {
        let v = json_output(&train(&[&["info", "--json"], args].concat()));
        let m = &v["memory"];
        let part = |k: &str| m[k].as_u64().unwrap();
        let parts = ["weights", "gradients", "optimizer", "activations", "logits"];
        assert_eq!(parts.iter().map(|k| part(k)).sum::<u64>(), part("total"));
        (
            v["command"].as_str().unwrap().to_string(),
            part("weights"),
            part("activations"),
            part("logits"),
        )
    };
    let bench = ["--recipe", "recipes/bench-sft-15m.toml"];
    let p15 = params("configs/tiny-15m-untied.toml");
    let (command, weights, activations, logits) = plan(&bench);
    assert_eq!((command.as_str(), weights), ("sft", 4 * p15));
    assert!(activations > 0 && logits > 0);
    let halved = plan(&[&bench[..], &["--set", "train.micro_batch_size=4"]].concat());
    assert_eq!((halved.2 * 2, halved.3 * 2), (activations, logits));
    // Another architecture for the same recipe.
    let (_, weights, _, _) = plan(&[&bench[..], &["--config", "configs/tiny-110m.toml"]].concat());
    assert_eq!(weights, 4 * params("configs/tiny-110m.toml"));
    // A reward model has no logits; PPO holds the policy, value, reference and two reward models.
    let tiny = params("configs/tiny-test.toml");
    let with_tiny =
        |recipe: &str| plan(&["--recipe", recipe, "--config", "configs/tiny-test.toml"]);
    let (command, _, _, logits) = with_tiny("recipes/reward-tiny.toml");
    assert_eq!((command.as_str(), logits), ("reward", 0));
    let (command, weights, _, _) = with_tiny("recipes/ppo-tiny.toml");
    assert_eq!((command.as_str(), weights), ("ppo", 5 * 4 * tiny));
    // A run prints its plan when it starts.
    let tmp = tempfile::tempdir().unwrap();
    let (run, _) = sft(&tmp.path().join("run"), &sets(&["train.max_steps=1"]));
    assert_success(&run);
    assert!(
        stderr(&run).contains("memory plan: weights"),
        "{}",
        stderr(&run)
    );
}

fn generate_json(extra: &[&str]) -> Vec<serde_json::Value> {
    let out = generate(&golden_dir("tiny-gqa"), &[&["--json"][..], extra].concat());
    assert_success(&out);
    parse_jsonl(&stdout(&out))
}

#[test]
fn generate_json_reports_prompt_and_new_tokens() {
    let objects = generate_json(&["--prompt", "Once upon a time", "--max-new-tokens", "8"]);
    assert_eq!(objects.len(), 1);
    let o = &objects[0];
    let prompt = json_u64s(&o["prompt_tokens"]);
    assert_eq!(prompt[0], 1, "BOS first");
    let tokens = o["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 8);
    assert!(o["text"].is_string());
    // Greedy is deterministic; one prompt alone equals the same prompt in a batch.
    let again = generate_json(&["--prompt", "Once upon a time", "--max-new-tokens", "8"]);
    assert_eq!(again[0]["tokens"], o["tokens"]);
    let batch = generate_json(&[
        "--prompt",
        "A much longer prompt that needs padding in a batch",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[1]["tokens"], o["tokens"]);
}

#[test]
fn generate_sampling_follows_the_seed() {
    let args = |seed: &'static str| {
        vec![
            "--prompt",
            "The dog",
            "--max-new-tokens",
            "10",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ]
    };
    let a = generate_json(&args("1"));
    let b = generate_json(&args("1"));
    assert_eq!(a[0]["tokens"], b[0]["tokens"]);
    let differs = ["2", "3", "4"]
        .iter()
        .any(|s| generate_json(&args(s))[0]["tokens"] != a[0]["tokens"]);
    assert!(differs, "different seeds should give different samples");
}

#[test]
fn generate_chat_wraps_prompt_with_bos_by_id() {
    let plain = generate_json(&["--prompt", "Hello", "--max-new-tokens", "1"]);
    let chat = generate_json(&[
        "--prompt",
        "Hello",
        "--chat",
        "--system",
        "Be kind.",
        "--max-new-tokens",
        "1",
    ]);
    let ids = |v: &serde_json::Value| json_u64s(&v["prompt_tokens"]);
    let chat_ids = ids(&chat[0]);
    assert_eq!(chat_ids[0], 1);
    assert_eq!(chat_ids.iter().filter(|&&i| i == 1).count(), 1);
    assert!(chat_ids.len() > ids(&plain[0]).len() + 5);
}

#[test]
fn bad_input_gives_one_line_errors() {
    let model = golden_dir("tiny-gqa");
    assert_user_error(
        &generate(Path::new("/nonexistent"), &["--prompt", "x"]),
        "/nonexistent",
    );
    assert_user_error(&generate(&model, &["--prompt", "  "]), "empty");
    let long = "word ".repeat(400);
    assert_user_error(&generate(&model, &["--prompt", &long]), "context");
    assert_user_error(
        &generate(&model, &["--prompt", "x", "--device", "gpu9"]),
        "unknown device",
    );

    let tmp = tempfile::tempdir().unwrap();
    // A model directory without config.json.
    let tokenizer = model.join("tokenizer.json");
    assert_user_error(
        &generate(
            tmp.path(),
            &["--prompt", "x", "--tokenizer", arg(&tokenizer)],
        ),
        "config.json",
    );
    // A tokenizer larger than the model's vocabulary.
    let big = tmp.path().join("big.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..100 {
        vocab.insert(format!("extra{i}"), (600 + i).into());
    }
    std::fs::write(&big, tok.to_string()).unwrap();
    assert_user_error(
        &generate(&model, &["--prompt", "x", "--tokenizer", arg(&big)]),
        "vocabulary",
    );
    // A config for another architecture.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(model.join(f), other.join(f)).unwrap();
    }
    std::fs::write(
        other.join("config.json"),
        r#"{"model_type": "gpt2", "vocab_size": 512}"#,
    )
    .unwrap();
    assert_user_error(&generate(&other, &["--prompt", "x"]), "model_type");
    assert_user_error(
        &train(&["info", "--config", "configs/nope.toml"]),
        "nope.toml",
    );
}

#[test]
fn export_writes_a_loadable_directory_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("export");
    let src = golden_dir("tiny-odd");
    assert_success(&export(&src, &out, &["--max-shard-size", "200KB"]));
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Refuses to overwrite, then generates the same tokens as the source.
    assert_user_error(&export(&src, &out, &[]), "already exists");
    let gen = |dir: &Path| {
        let args = ["--prompt", "Hello there", "--json", "--max-new-tokens", "6"];
        let o = generate(dir, &args);
        assert_success(&o);
        stdout(&o)
    };
    assert_eq!(gen(&src), gen(&out));
}

#[test]
fn exported_checkpoints_load_in_transformers_with_equal_logits() {
    let Some(python) = python_with_transformers() else {
        return;
    };
    // Exports of checkpoints saved by either transformers version must load in both: the
    // reference is each fixture's golden logits, computed by the version that saved it.
    let mut versions = vec![("4.57.1", None)];
    if let Some(overlay) = transformers5_path() {
        versions.push(("5.x", Some(overlay)));
    }
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("tiny-odd", vec!["--max-shard-size", "200KB"]),
        ("tiny-gqa", vec![]),
        ("golden-tf5/tiny-odd", vec![]),
        ("golden-tf5/tiny-gqa-bf16-sharded", vec![]),
        ("tiny-rope-linear", vec![]),
        ("golden-tf5/tiny-rope-dynamic", vec![]),
    ] {
        let src = golden_dir(name);
        let out = tmp.path().join(name.replace('/', "-"));
        assert_success(&export(
            &src,
            &out,
            &[&["--dtype", "f32"][..], &extra[..]].concat(),
        ));
        // Our config.json keeps the 4.x layout, which both versions read.
        let config = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(config.contains("\"rope_theta\"") && !config.contains("rope_parameters"));
        for (version, overlay) in &versions {
            let mut command = Command::new(&python);
            if let Some(overlay) = overlay {
                command.env("PYTHONPATH", overlay);
            }
            let check = command
                .arg(root().join("scripts/check_export.py"))
                .args([&src, &out])
                .output()
                .expect("run python");
            let report = String::from_utf8_lossy(&check.stdout);
            assert!(
                check.status.success(),
                "{name} in {version}: {report} {}",
                String::from_utf8_lossy(&check.stderr)
            );
            let v: serde_json::Value =
                serde_json::from_str(report.lines().last().unwrap()).unwrap();
            assert!(v["max_abs_diff"].as_f64().unwrap() <= 1e-4, "{name}: {v}");
            assert_eq!(v["architecture"], "LlamaForCausalLM");
            let major = v["transformers"]
                .as_str()
                .unwrap()
                .split('.')
                .next()
                .unwrap();
            assert_eq!(major, &version[..1], "{name}: ran in {v}");
        }
    }
}

/// Exports carry `tokenizer_config.json` with the Llama 2 chat template: `apply_chat_template`
/// in transformers 4.57.1 and 5.x gives exactly our chat encoding for one and several turns,
/// with and without a system prompt, ending with an answer or open for generation, both with
/// Llama 2's SentencePiece tokenizer (from ../shared) and with the byte-level fixture tokenizer.
#[test]
fn exported_chat_template_gives_our_chat_encoding() {
    use data::{Message, Role::*};
    let m = Message::new;
    let dialogs = vec![
        vec![m(User, "What is the capital of France?")],
        vec![
            m(System, "You are a careful assistant.\nAnswer briefly."),
            m(User, "Hi!"),
        ],
        vec![
            m(User, "Name a colour."),
            m(Assistant, " Blue. "),
            m(User, "Another one, please."),
        ],
        vec![
            m(System, "Be kind."),
            m(User, "  Tell me a joke about llamas. "),
            m(
                Assistant,
                "Why did the llama cross the road?\n\nTo get to the other side.",
            ),
            m(User, "Caf\u{e9} \u{65e5}\u{672c} \u{1f999}: one more"),
            m(Assistant, "Sure: 12.5% of llamas\u{2014}no."),
        ],
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut tokenizers = vec![("byte-level", golden_dir("tiny-gqa").join("tokenizer.json"))];
    if let Some(shared) = shared_dir() {
        tokenizers.push(("llama2", shared.join("tokenizers/llama2/tokenizer.json")));
    }
    let python = python_with_transformers();
    let mut versions = vec![None];
    if let Some(overlay) = transformers5_path() {
        versions.push(Some(overlay));
    }
    let dialogs_file = tmp.path().join("dialogs.json");
    std::fs::write(&dialogs_file, serde_json::to_string(&dialogs).unwrap()).unwrap();
    for (name, tokenizer_file) in tokenizers {
        let out = tmp.path().join(name);
        let tok = tokenizer_file.to_str().unwrap();
        assert_success(&export(
            &golden_dir("tiny-gqa"),
            &out,
            &["--tokenizer", tok],
        ));
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert!(config["chat_template"]
            .as_str()
            .unwrap()
            .contains("[/INST]"));
        assert!(out.join("special_tokens_map.json").exists());
        let tokenizer = data::Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
        let ours: Vec<Vec<u32>> = dialogs
            .iter()
            .map(|d| data::render_dialog(&tokenizer, d).unwrap().ids)
            .collect();
        let Some(python) = &python else { continue };
        for overlay in &versions {
            let mut command = Command::new(python);
            if let Some(overlay) = overlay {
                command.env("PYTHONPATH", overlay);
            }
            let o = command
                .arg(root().join("scripts/check_chat_template.py"))
                .args([&out, &dialogs_file])
                .output()
                .expect("run python");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let report: serde_json::Value =
                serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
            let theirs: Vec<Vec<u32>> = report["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ids| json_u64s(ids).into_iter().map(|i| i as u32).collect())
                .collect();
            for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
                assert_eq!(a, b, "{name}, dialog {i}, {report}");
            }
            assert_eq!(
                report["invalid_refused"],
                serde_json::json!([true, true, true])
            );
            assert_eq!(theirs.len(), ours.len());
        }
    }
}

const ALPACA: &str = "datasets/alpaca-tiny.jsonl";

fn inspect_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["data", "inspect"];
    all.extend_from_slice(args);
    all.push("--json");
    json_output(&train(&all))
}

#[test]
fn data_inspect_reports_counts_for_files_and_recipes() {
    let tok = FIXTURE_TOKENIZER;
    let v = inspect_json(&[ALPACA, "datasets/hh-tiny.jsonl.gz", "--tokenizer", tok]);
    assert_eq!(v["examples"], 100);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["sources"][1]["format"], "hh-rlhf");
    assert!(v["tokens"]["p50"].as_u64().unwrap() > 0);

    let v = inspect_json(&["--recipe", "tests/fixtures/recipes/data-mixture.toml"]);
    assert_eq!(v["examples"], 70);
    assert_eq!(v["eval"], 7);
    assert_eq!(v["sources"][1]["selected"], 10);

    // Without --json: rendered examples with the trained span bracketed (not a terminal).
    let out = train(&["data", "inspect", ALPACA, "--tokenizer", tok, "--n", "1"]);
    let text = stdout(&out);
    assert!(text.contains("[alpaca, detected]"), "{text}");
    assert!(text.contains("[[") && text.contains("</s>]]"), "{text}");
}

#[test]
fn data_inspect_stops_or_skips_on_bad_records() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"output\": 5}\n",
    )
    .unwrap();
    let tok = FIXTURE_TOKENIZER;
    let out = train(&["data", "inspect", bad.to_str().unwrap(), "--tokenizer", tok]);
    assert_user_error(&out, "bad.jsonl:2: field `output`: must be a string");
    let v = inspect_json(&[bad.to_str().unwrap(), "--tokenizer", tok, "--skip-errors"]);
    assert_eq!(
        (v["examples"].as_u64(), v["errors"].as_u64()),
        (Some(1), Some(1))
    );
    assert_user_error(
        &train(&["data", "inspect", "missing.jsonl", "--tokenizer", tok]),
        "missing.jsonl: file not found",
    );
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[model]\ntokenizer = \"t.json\"\n[data]\ntrian = \"x\"\n",
    )
    .unwrap();
    assert_user_error(
        &train(&["data", "inspect", "--recipe", recipe.to_str().unwrap()]),
        "trian",
    );
}

/// Runs `train sft` on the tiny recipe, on LLAMA_TEST_DEVICE when set (flex by default).
fn sft(out: &Path, extra: &[&str]) -> (Output, Vec<serde_json::Value>) {
    run_recipe("sft", "recipes/sft-tiny.toml", out, extra)
}

#[test]
fn bf16_runs_learn_near_f32_resume_exactly_and_save_their_dtype() {
    // The recipe's full 300 steps: round-to-nearest bf16 updates stalled over that length (33%
    // above f32 at the end) while 40 steps looked fine.
    let tmp = tempfile::tempdir().unwrap();
    let steps = sets(&[
        "train.max_steps=300",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=280",
    ]);
    let final_loss = |dtype: &str| {
        let dtype_set = format!("runtime.dtype=\"{dtype}\"");
        let (run, metrics) = sft(
            &tmp.path().join(dtype),
            &[&steps[..], &sets(&[&dtype_set])].concat(),
        );
        assert_success(&run);
        let losses: Vec<f64> = metrics.iter().filter_map(|v| v["loss"].as_f64()).collect();
        assert_eq!(losses.len(), 300, "{dtype}");
        let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
        // The last 20 steps' mean: one batch's loss in bf16 moves by a few percent with the
        // CPU's bf16 kernels (README, "Precision").
        let last: f64 = losses[280..].iter().sum::<f64>() / 20.0;
        assert!(last < first - 0.5, "{dtype}: {first} -> {last}");
        (last, metrics)
    };
    let (reference, _) = final_loss("f32");
    for dtype in ["bf16", "bf16-mixed"] {
        let (loss, metrics) = final_loss(dtype);
        assert!(
            (loss - reference).abs() <= 0.02 * reference,
            "{dtype}: mean loss of the last 20 steps {loss} against f32 {reference}"
        );
        // Checkpoints keep the run's dtype: bf16 weights are saved as bf16, exactly.
        let checkpoint = tmp.path().join(dtype).join("checkpoint-300");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
                .unwrap();
        let saved = if dtype == "bf16" {
            "bfloat16"
        } else {
            "float32"
        };
        assert_eq!(config["torch_dtype"], saved, "{dtype}");
        // Resuming at step 280 retraces steps 281 to 300 exactly (bf16's rounding noise too).
        let from = tmp.path().join(dtype).join("checkpoint-280");
        let dtype_set = format!("runtime.dtype=\"{dtype}\"");
        let mut args = [&steps[..], &sets(&[&dtype_set])].concat();
        args.extend(["--resume", arg(&from)]);
        let (run, resumed) = sft(&tmp.path().join(format!("{dtype}-resumed")), &args);
        assert_success(&run);
        let tail: Vec<(u64, f64)> = losses_by_step(&metrics).into_iter().skip(280).collect();
        assert_eq!(tail.len(), 20);
        assert_eq!(losses_by_step(&resumed), tail, "{dtype}");
    }
    let (run, _) = sft(&tmp.path().join("x"), &sets(&["runtime.dtype=\"f16\""]));
    assert_user_error(&run, "`dtype` must be");
}

#[test]
fn sft_trains_deterministically_and_writes_a_usable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = sets(&[
        "train.max_steps=30",
        "train.log_every=1",
        "train.eval_every=10",
    ]);
    let (run, a) = sft(&tmp.path().join("a"), &steps);
    assert_success(&run);
    let (_, b) = sft(&tmp.path().join("b"), &steps);
    let losses = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|v| v["loss"].as_f64()).collect()
    };
    assert_eq!(losses(&a).len(), 30);
    assert_eq!(losses(&a), losses(&b), "same seed, same losses");
    // Activation checkpointing recomputes each layer instead of storing it: the same losses
    // (to rounding, over 30 steps of training: 1e-5) and gradient norms. The recomputed
    // forward pass rounds differently and the difference compounds over the steps; a norm at a
    // loss spike amplifies it (1.4e-5 relative at step 30 on an AMD EPYC), so norms get 1e-4.
    let checkpointed = [&steps[..], &sets(&["train.activation_checkpointing=true"])].concat();
    let (_, c) = sft(&tmp.path().join("c"), &checkpointed);
    let norms = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|v| v["grad_norm"].as_f64()).collect()
    };
    for (x, y, tolerance) in [(losses(&a), losses(&c), 1e-5), (norms(&a), norms(&c), 1e-4)] {
        assert_eq!(x.len(), 30);
        assert!(
            x.iter()
                .zip(&y)
                .all(|(x, y)| (x - y).abs() <= tolerance * x.abs().max(1.0)),
            "{x:?} vs {y:?}"
        );
    }
    for line in a.iter().filter(|v| v.get("loss").is_some()) {
        for key in ["step", "lr", "grad_norm", "tokens_per_sec"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
    }
    let first: f64 = losses(&a)[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses(&a)[27..].iter().sum::<f64>() / 3.0;
    assert!(last < first - 0.5, "loss should fall: {first} -> {last}");
    assert_eq!(a.iter().filter(|v| v.get("eval_loss").is_some()).count(), 3);
    // TensorBoard event files: TFRecord frames (length, crc, data, crc) back to back, holding
    // the scalar tags.
    let events: Vec<_> = std::fs::read_dir(tmp.path().join("a/tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1);
    let bytes = std::fs::read(&events[0]).unwrap();
    let mut at = 0;
    let mut records = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 8 + 4 + len + 4;
        records += 1;
    }
    assert_eq!(at, bytes.len(), "TFRecord framing");
    assert!(records > 30);
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("train/loss") && text.contains("eval/eval_loss"));
    // The checkpoint is a Hugging Face directory that generate reads, and the resolved recipe
    // sits beside it.
    let checkpoint = tmp.path().join("a/checkpoint-30");
    assert!(tmp.path().join("a/recipe.toml").exists());
    assert_success(&generate(
        &checkpoint,
        &["--prompt", "Hi", "--max-new-tokens", "4"],
    ));
    // A second run into the same directory is refused.
    let (again, _) = sft(&tmp.path().join("a"), &steps);
    assert_user_error(&again, "holds another run");
}

#[test]
fn sft_bad_recipes_fail_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, _) = sft(&tmp.path().join("x"), &sets(&["train.micro_batch_size=3"]));
    assert_user_error(&run, "not divisible");
    let (run, _) = sft(
        &tmp.path().join("x"),
        &sets(&["train.batch_size=4000", "train.micro_batch_size=1"]),
    );
    assert_user_error(&run, "fewer than one batch");
    assert!(
        !tmp.path().join("x").exists(),
        "nothing written before training starts"
    );
    let (run, _) = sft(&tmp.path().join("x"), &["--set", "train.learning_rate=1"]);
    assert_user_error(&run, "learning_rate");
    // A diverging run stops with a clear message and keeps its last good checkpoint.
    let (run, _) = sft(
        &tmp.path().join("nan"),
        &sets(&[
            "train.lr=1e30",
            "train.grad_clip=1e30",
            "train.warmup_steps=0",
            "train.save_every=1",
            "train.max_steps=50",
        ]),
    );
    assert_user_error(&run, "diverged");
    assert!(tmp
        .path()
        .join("nan/checkpoint-1/model.safetensors")
        .exists());
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = sets(&[
        "train.max_steps=12",
        "train.log_every=1",
        "train.save_every=5",
        "train.keep_last=10",
    ]);
    let full = tmp.path().join("full");
    let (run, reference) = sft(&full, &steps);
    assert_success(&run);
    // A run that stopped after step 5: only its first checkpoint survives.
    let stopped = tmp.path().join("stopped");
    copy_tree(&full, &stopped);
    for step in [10, 12] {
        std::fs::remove_dir_all(stopped.join(format!("checkpoint-{step}"))).unwrap();
    }
    let (run, resumed) = sft(&stopped, &[&steps[..], &["--resume", "latest"]].concat());
    assert_success(&run);
    assert!(stderr(&run).contains("at step 5"), "{}", stderr(&run));
    let a = losses_by_step(&reference);
    let b = losses_by_step(&resumed);
    assert_eq!(a.len(), 12);
    assert_eq!(
        b.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6, "step {step}: {x} vs {y}");
    }
}

#[test]
fn a_killed_run_resumes_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("killed");
    let dir = format!("output.dir=\"{}\"", out.display());
    let steps = ["train.max_steps=40", "train.save_every=2"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["sft", "--recipe", "recipes/sft-tiny.toml", "--set", &dir])
        .args(sets(&steps))
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // Kill as soon as any checkpoint exists (keep_last prunes old ones, so don't wait for one name).
    let has_checkpoint = |out: &Path| {
        std::fs::read_dir(out).is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        })
    };
    while !has_checkpoint(&out) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (run, metrics) = sft(&out, &resume_latest(&steps));
    assert_success(&run);
    let steps: Vec<u64> = losses_by_step(&metrics).iter().map(|p| p.0).collect();
    assert_eq!(steps.last(), Some(&40));
    // Every step is logged once: the resumed log continues where the checkpoint was.
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(unique, steps);
    assert!(out.join("checkpoint-40/model.safetensors").exists());
}

fn meta_fixture(name: &str) -> std::path::PathBuf {
    root().join("tests/fixtures/meta").join(name)
}

/// A converted model against the reference: its weights are transformers' state dict of the
/// same model bit for bit, and every check of `train verify` passes, with logits within 1e-5
/// of transformers' relative to their scale (max |difference| / max |logit|; logits reach 8.9
/// here, and f32 summation order alone moves them by 1e-5 absolute).
fn assert_matches_reference(model_dir: &Path, reference: &str) {
    let reference_dir = meta_fixture(reference);
    let theirs =
        llama::shards::SafetensorsDir::open_file(&reference_dir.join("weights.safetensors"))
            .unwrap();
    let ours = llama::shards::SafetensorsDir::open(model_dir).unwrap();
    let mut names: Vec<&str> = theirs.names().collect();
    names.sort();
    assert_eq!(names.len(), 3 + 9 * 2, "{names:?}");
    for name in names {
        let shape = theirs.shape(name).unwrap();
        assert_eq!(
            ours.read_f32(name, &shape).unwrap(),
            theirs.read_f32(name, &shape).unwrap(),
            "{name}"
        );
    }
    let device = burn::prelude::Device::flex();
    let (_, model) = llama::load_pretrained(model_dir, &device).expect("load");
    let reference = llama::reference::Reference::load(&reference_dir).unwrap();
    let checks = llama::reference::verify(&model, &reference).unwrap();
    for check in &checks {
        assert!(check.passed(), "{}: {check:?}", model_dir.display());
    }
    let scale = reference
        .logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    assert!(
        checks[0].name == "logits" && checks[0].measured <= 1e-5 * scale,
        "{checks:?}"
    );
}

/// `train convert --meta` on Meta-layout fixtures (1 rank in f32; 2 ranks in bf16 with
/// `rope.freqs`, tokenizer.model beside the checkpoint as in Meta's download): the model gives
/// transformers' logits, and the tokenizer.json built from tokenizer.model gives SentencePiece's
/// ids on every reference text; the output carries the chat template.
#[test]
fn meta_checkpoints_convert_to_transformers_logits_and_sentencepiece_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let expected: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(meta_fixture("tokenizer_reference.json")).unwrap(),
    )
    .unwrap();
    for (name, dtype) in [("mp1", "float32"), ("mp2", "bfloat16")] {
        let out = tmp.path().join(name);
        let meta = meta_fixture(&format!("tiny-{name}"));
        let o = train(&[
            "convert",
            "--meta",
            meta.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_success(&o);
        assert_matches_reference(&out, &format!("reference-{name}"));
        let config = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(
            config.contains(&format!("\"torch_dtype\": \"{dtype}\"")),
            "{config}"
        );
        assert!(
            config.contains("\"max_position_embeddings\": 4096"),
            "{config}"
        );
        for file in [
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert!(out.join(file).is_file(), "{name}: {file}");
        }
        let tokenizer = data::Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
        for record in &expected {
            let ids: Vec<u32> = json_u64s(&record["ids"])
                .into_iter()
                .map(|i| i as u32)
                .collect();
            let text = record["text"].as_str().unwrap();
            assert_eq!(tokenizer.encode_with_bos(text).unwrap(), ids, "{text:?}");
        }
        assert!(expected.len() >= 40);
    }
}

/// `train export --meta` writes Meta's layout for a chosen model-parallel size: converting it
/// back gives the same weights bit for bit, Meta's forward pass (scripts/check_meta.py, on
/// `torch.load(weights_only=True)`) gives transformers' logits, and sizes that do not divide
/// the heads are refused.
#[test]
fn meta_export_round_trips_and_runs_as_meta_code() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let mp1 = meta_fixture("tiny-mp1");
    assert_success(&train(&[
        "convert",
        "--meta",
        mp1.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]));
    let python = python_with_transformers();
    for ranks in ["1", "2"] {
        let meta = tmp.path().join(format!("meta-{ranks}"));
        let o = train(&[
            "export",
            "--checkpoint",
            hf.to_str().unwrap(),
            "--meta",
            meta.to_str().unwrap(),
            "--model-parallel",
            ranks,
        ]);
        assert_success(&o);
        let params: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(meta.join("params.json")).unwrap())
                .unwrap();
        assert_eq!(params["dim"], 32);
        assert_eq!(params["n_kv_heads"], 2);
        // 96 = 32 * ceil(85 / 32): the first multiple that reproduces the width.
        assert_eq!(params["multiple_of"], 32);
        assert!(meta.join("tokenizer.model").is_file());
        let shards = std::fs::read_dir(&meta)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("consolidated.")
            })
            .count();
        assert_eq!(shards.to_string(), ranks);
        let back = tmp.path().join(format!("back-{ranks}"));
        assert_success(&train(&[
            "convert",
            "--meta",
            meta.to_str().unwrap(),
            "--out",
            back.to_str().unwrap(),
        ]));
        assert_eq!(
            std::fs::read(back.join("model.safetensors")).unwrap(),
            std::fs::read(hf.join("model.safetensors")).unwrap(),
            "{ranks} rank(s): weights changed on the way through Meta's layout"
        );
        if let Some(python) = &python {
            let o = Command::new(python)
                .arg(root().join("scripts/check_meta.py"))
                .args([&meta, &meta_fixture("reference-mp1")])
                .output()
                .expect("run python");
            assert!(o.status.success(), "{} {}", stdout(&o), stderr(&o));
            assert!(
                stdout(&o).contains(&format!("\"ranks\": {ranks}")),
                "{}",
                stdout(&o)
            );
        }
    }
    let o = train(&[
        "export",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--meta",
        tmp.path().join("meta-3").to_str().unwrap(),
        "--model-parallel",
        "3",
    ]);
    assert_user_error(&o, "model-parallel size 3 does not divide");
    // Meta's format has no RoPE scaling: refused, not silently dropped.
    let o = train(&[
        "export",
        "--checkpoint",
        golden_dir("tiny-rope-linear").to_str().unwrap(),
        "--meta",
        tmp.path().join("meta-rope").to_str().unwrap(),
    ]);
    assert_user_error(&o, "no RoPE scaling");
}

/// Broken Meta checkpoints fail on one line that names the file and the tensor or field.
#[test]
fn bad_meta_checkpoints_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let convert = |dir: &Path| {
        train(&[
            "convert",
            "--meta",
            dir.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ])
    };
    let fresh = |name: &str| {
        let dir = tmp.path().join(name);
        copy_tree(&meta_fixture("tiny-mp2"), &dir);
        dir
    };
    // A missing rank.
    let dir = fresh("gap");
    std::fs::rename(
        dir.join("consolidated.01.pth"),
        dir.join("consolidated.02.pth"),
    )
    .unwrap();
    assert_user_error(&convert(&dir), "consolidated.01.pth: missing");
    // Ranks of different model-parallel sizes: a 1-rank file among 2-rank ones.
    let dir = fresh("mixed");
    std::fs::copy(
        meta_fixture("tiny-mp1/consolidated.00.pth"),
        dir.join("consolidated.00.pth"),
    )
    .unwrap();
    let o = convert(&dir);
    assert_user_error(&o, "consolidated.00.pth");
    assert_user_error(&o, "has shape");
    // params.json that does not match the shards.
    let dir = fresh("params");
    edit_json(&dir.join("params.json"), |p| p["n_heads"] = 8.into());
    let o = convert(&dir);
    assert_user_error(&o, "layers.0.attention.wk.weight");
    let dir = fresh("layers");
    edit_json(&dir.join("params.json"), |p| p["n_layers"] = 1.into());
    assert_user_error(&convert(&dir), "`n_layers` 1 does not match");
    let dir = fresh("huge");
    edit_json(&dir.join("params.json"), |p| {
        p["n_layers"] = 2u64.pow(60).into();
        p["dim"] = 2u64.pow(62).into();
    });
    assert_user_error(&convert(&dir), "n_layers");
    let dir = fresh("wide");
    edit_json(&dir.join("params.json"), |p| p["dim"] = 2u64.pow(62).into());
    assert_user_error(&convert(&dir), "params.json");
    let dir = fresh("field");
    edit_json(&dir.join("params.json"), |p| {
        p["use_scaled_rope"] = true.into()
    });
    let o = convert(&dir);
    assert_user_error(&o, "params.json");
    assert_user_error(&o, "use_scaled_rope");
    // Not a state dict: a file that is no PyTorch archive, and a pickle of a list.
    let dir = fresh("garbage");
    std::fs::write(dir.join("consolidated.01.pth"), b"not a checkpoint").unwrap();
    assert_user_error(&convert(&dir), "consolidated.01.pth");
    let dir = fresh("list");
    // Protocol 2: an empty list, then STOP.
    std::fs::write(dir.join("consolidated.01.pth"), b"\x80\x02].").unwrap();
    assert_user_error(&convert(&dir), "consolidated.01.pth");
    let o = convert(&tmp.path().join("nowhere"));
    assert_user_error(&o, "params.json");
}
