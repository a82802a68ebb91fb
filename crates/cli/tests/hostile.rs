//! Inputs and faults a hostile new user found (issue 12), each fed exactly: every one must end
//! in a one-line error (exit 1) or the right behaviour, never a panic, a hang or lost data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use test_support::*;

/// `train` with a deadline: a run still going after `seconds` is killed and the test fails
/// (the hang it guards against would otherwise stall the suite forever).
fn train_within(args: &[&str], seconds: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run train");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("train {args:?} still running after {seconds} s: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn sft(out: &Path, extra: &[&str]) -> Output {
    let mut args = sets(&["train.max_steps=2", "train.log_every=1"]);
    args.extend_from_slice(extra);
    run_recipe("sft", "recipes/sft-tiny.toml", out, &args).0
}

/// A copy of a golden model whose config.json is changed by `edit`.
fn edited_model(to: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    copy_tree(&golden_dir("tiny-gqa"), to);
    edit_json(&to.join("config.json"), edit);
    to.to_path_buf()
}

/// Overwrites every value of tensor `name` in a safetensors file with NaN (f32 data).
fn poison_tensor(file: &Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let offsets = &header[name]["data_offsets"];
    let (start, end) = (
        8 + header_len + offsets[0].as_u64().unwrap() as usize,
        8 + header_len + offsets[1].as_u64().unwrap() as usize,
    );
    for chunk in bytes[start..end].chunks_exact_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(file, bytes).unwrap();
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_truncated_gzip_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = std::fs::read(root().join("datasets/hh-tiny.jsonl.gz")).unwrap();
    let cut = tmp.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let cut = cut.to_str().unwrap();
    for extra in [&[][..], &["--skip-errors"][..]] {
        let mut args = vec!["data", "inspect", cut, "--tokenizer", FIXTURE_TOKENIZER];
        args.extend_from_slice(extra);
        assert_user_error(
            &train_within(&args, 60),
            "cut.jsonl.gz: cannot read past line",
        );
    }
    let out = tmp.path().join("run");
    let source = format!("data.sources=[{{path = \"{cut}\"}}]");
    let dir = format!("output.dir=\"{}\"", out.display());
    let mut args = vec!["sft", "--recipe", "recipes/sft-tiny.toml"];
    args.extend(sets(&[&dir, &source, "data.on_error=\"skip\""]));
    assert_user_error(&train_within(&args, 120), "cannot read past line");
    assert!(
        !out.exists(),
        "nothing is left behind by a run that never started"
    );
}

#[test]
fn overwrite_never_deletes_a_directory_that_holds_no_run() {
    let tmp = tempfile::tempdir().unwrap();
    let user = tmp.path().join("my-data");
    std::fs::create_dir_all(user.join("photos")).unwrap();
    std::fs::write(user.join("thesis.tex"), "years of work").unwrap();
    let before = names_in(&user);
    let run = sft(&user, &["--overwrite"]);
    assert_user_error(&run, "no run of `train`");
    assert_eq!(names_in(&user), before);
    assert_eq!(
        std::fs::read_to_string(user.join("thesis.tex")).unwrap(),
        "years of work"
    );
    // A directory that holds a run of ours is replaced.
    let ours = tmp.path().join("ours");
    assert_success(&sft(&ours, &[]));
    std::fs::write(ours.join("stale.txt"), "from the old run").unwrap();
    let again = sft(&ours, &["--overwrite"]);
    assert_success(&again);
    assert!(!ours.join("stale.txt").exists());
    assert!(ours.join("checkpoint-2").is_dir());
}

#[test]
fn training_values_are_range_checked_and_blamed_on_their_source() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    for (set, needle) in [
        (
            "train.grad_clip=-1",
            "--set train.grad_clip=-1: [train] `grad_clip` must be >= 0",
        ),
        (
            "train.betas=[0.9, 1.0]",
            "`betas` must both be within [0, 1)",
        ),
        (
            "train.betas=[-0.1, 0.9]",
            "`betas` must both be within [0, 1)",
        ),
        (
            "train.eps=0",
            "--set train.eps=0: [train] `eps` must be a positive number",
        ),
        ("train.lr=abc", "--set train.lr=abc: invalid type"),
        (
            "data.format=\"bogus\"",
            "--set data.format=\"bogus\": [data] `format`: unknown format `bogus`",
        ),
        (
            "data.eval=\"x.jsonl\"",
            "give `eval` or `eval_fraction`, not both",
        ),
    ] {
        assert_user_error(&sft(&out, &sets(&[set])), needle);
    }
    assert!(!out.exists());
    // An I/O error names its cause once.
    let missing = train(&["sft", "--recipe", "recipes/missing.toml"]);
    assert_user_error(&missing, "recipes/missing.toml");
    assert_eq!(
        stderr(&missing).matches("No such file").count(),
        1,
        "{}",
        stderr(&missing)
    );
    // grad_clip = 0 turns clipping off; it does not stop learning.
    let (run, metrics) = run_recipe(
        "sft",
        "recipes/sft-tiny.toml",
        &tmp.path().join("noclip"),
        &sets(&[
            "train.grad_clip=0",
            "train.max_steps=30",
            "train.log_every=1",
        ]),
    );
    assert_success(&run);
    let losses: Vec<f64> = losses_by_step(&metrics).into_iter().map(|p| p.1).collect();
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    assert!(mean(&losses[27..]) < mean(&losses[..3]) - 0.5, "{losses:?}");
}

#[test]
fn out_of_vocabulary_pad_ids_are_refused_before_anything_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = edited_model(&tmp.path().join("pad"), |c| {
        c["pad_token_id"] = 99999.into()
    });
    let run = generate(
        &model,
        &["--prompt", "Hi", "--prompt", "a longer prompt here"],
    );
    assert_user_error(&run, "`pad_token_id` 99999 is outside the vocabulary");
    // sft from it: refused, and the previous run in the output directory is untouched.
    let out = tmp.path().join("run");
    assert_success(&sft(&out, &[]));
    let before = names_in(&out);
    let recipe = recipe_from_checkpoint(tmp.path(), &model);
    let run = run_recipe("sft", recipe.to_str().unwrap(), &out, &["--overwrite"]).0;
    assert_user_error(&run, "`pad_token_id` 99999 is outside the vocabulary");
    assert_eq!(names_in(&out), before);
    assert!(out.join("checkpoint-2/model.safetensors").exists());
}

/// recipes/sft-tiny.toml starting from `checkpoint` instead of a fresh model, written into `dir`
/// with absolute paths.
fn recipe_from_checkpoint(dir: &Path, checkpoint: &Path) -> PathBuf {
    let root = root().canonicalize().unwrap();
    let text = std::fs::read_to_string(root.join("recipes/sft-tiny.toml"))
        .unwrap()
        .replace(
            "config = \"../configs/tiny-test.toml\"",
            &format!("checkpoint = \"{}\"", checkpoint.display()),
        )
        .replace("\"../", &format!("\"{}/", root.display()));
    let path = dir.join("from-checkpoint.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_recipe_path_that_is_not_utf8_is_an_error() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp
        .path()
        .join(std::ffi::OsStr::from_bytes(b"bad-\xff-dir"));
    std::fs::create_dir(&dir).unwrap();
    let recipe = dir.join("r.toml");
    // The output directory stays inside the non-UTF-8 directory (`../runs` would normalise
    // out of it).
    let text = std::fs::read_to_string(root().join("recipes/sft-tiny.toml"))
        .unwrap()
        .replace("dir = \"../runs/sft-tiny\"", "dir = \"out\"");
    assert!(text.contains("dir = \"out\""));
    std::fs::write(&recipe, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("sft")
        .arg("--recipe")
        .arg(&recipe)
        .current_dir(root())
        .output()
        .unwrap();
    assert_user_error(&out, "not valid UTF-8");
}

#[test]
fn two_runs_never_share_an_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("busy");
    let dir = format!("output.dir=\"{}\"", out.display());
    let mut first = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["sft", "--recipe", "recipes/sft-tiny.toml"])
        .args(sets(&[
            &dir,
            "train.max_steps=100000",
            "train.save_every=1",
        ]))
        .current_dir(root())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("checkpoint-1").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let holder = format!("pid {}", first.id());
    let second = sft(&out, &["--overwrite"]);
    let resumed = sft(&out, &resume_latest(&[]));
    first.kill().unwrap();
    first.wait().unwrap();
    assert_user_error(&second, &holder);
    assert_user_error(&resumed, &holder);
    assert!(stderr(&second).contains("in use by another run"));
    // The OS released the lock with the killed process: the run can be resumed now.
    let again = sft(&out, &resume_latest(&["train.max_steps=3"]));
    assert_success(&again);
}

#[test]
fn resuming_with_another_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert_success(&sft(&out, &[]));
    // Same size, different vocabulary: two entries swapped.
    let other = tmp.path().join("other.json");
    std::fs::copy(fixture_tokenizer_path(), &other).unwrap();
    edit_json(&other, |tok| {
        let keys: Vec<String> = tok["model"]["vocab"]
            .as_object()
            .unwrap()
            .keys()
            .skip(100)
            .take(2)
            .cloned()
            .collect();
        swap_token_ids(tok, &keys[0], &keys[1]);
    });
    let set = format!("model.tokenizer=\"{}\"", other.display());
    let run = sft(&out, &resume_latest(&["train.max_steps=4", &set]));
    assert_user_error(
        &run,
        "differs from the one this checkpoint was trained with",
    );
    assert!(!out.join("checkpoint-4").exists());

    // The reported case: a 32k-vocabulary checkpoint resumed with the 512-token tokenizer,
    // which fits in its vocabulary and so passed every other check.
    let Some(shared) = shared_dir() else {
        return;
    };
    let big = tmp.path().join("run-32k");
    let llama_tokenizer = format!(
        "model.tokenizer=\"{}\"",
        shared.join(LLAMA2_TOKENIZER).display()
    );
    let config = format!(
        "model.config=\"{}\"",
        root().join("configs/tiny-32k.toml").display()
    );
    let run = sft(
        &big,
        &sets(&[&llama_tokenizer, &config, "train.max_steps=1"]),
    );
    assert_success(&run);
    let run = sft(&big, &resume_latest(&[&config]));
    assert_user_error(
        &run,
        "differs from the one this checkpoint was trained with",
    );
}

#[test]
fn sequences_longer_than_the_model_context_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let run = sft(&out, &sets(&["data.max_seq_len=1024"]));
    assert_user_error(
        &run,
        "data.max_seq_len 1024 exceeds the model's context of 256",
    );
    assert!(!out.exists());
}

#[test]
fn nan_weights_stop_generation_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("nan");
    copy_tree(&golden_dir("tiny-gqa"), &model);
    poison_tensor(&model.join("model.safetensors"), "model.norm.weight");
    for temperature in ["0", "1"] {
        let run = generate(&model, &["--prompt", "Hi", "--temperature", temperature]);
        assert_user_error(&run, "NaN or infinite logits");
        assert!(stdout(&run).is_empty(), "nothing printed: {}", stdout(&run));
    }
}

#[test]
fn ids_past_a_smaller_tokenizer_are_never_generated() {
    let tmp = tempfile::tempdir().unwrap();
    // A model whose embedding (600) is padded past its 512-token tokenizer.
    let config = tmp.path().join("tiny-600.toml");
    let text = std::fs::read_to_string(root().join("configs/tiny-test.toml")).unwrap();
    std::fs::write(
        &config,
        text.replace("vocab_size = 512", "vocab_size = 600"),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let set = format!("model.config=\"{}\"", config.display());
    let run = sft(&out, &sets(&[&set, "train.max_steps=1"]));
    assert_success(&run);
    let gen = generate(
        &out.join("checkpoint-1"),
        &[
            "--prompt",
            "Hi",
            "--temperature",
            "1.5",
            "--max-new-tokens",
            "64",
            "--json",
        ],
    );
    assert_success(&gen);
    assert_eq!(
        stderr(&gen).matches("never generated").count(),
        1,
        "{}",
        stderr(&gen)
    );
    let v = json_output(&gen);
    let tokens = json_u64s(&v["tokens"]);
    // Near-uniform over 600 ids: without the limit, 1 in 7 tokens would be past 511.
    assert!(tokens.len() >= 32, "{tokens:?}");
    assert!(tokens.iter().all(|&t| t < 512), "{tokens:?}");
}

#[test]
fn a_killed_save_leaves_nothing_behind_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert_success(&sft(&out, &[]));
    // What a save killed midway leaves: the staging checkpoint and save_pretrained's own.
    for stale in [
        ".checkpoint-3.partial",
        "..checkpoint-3.partial.partial-4242",
    ] {
        std::fs::create_dir_all(out.join(stale)).unwrap();
        std::fs::write(out.join(stale).join("model.safetensors"), vec![0u8; 1000]).unwrap();
    }
    let run = sft(&out, &resume_latest(&["train.max_steps=3"]));
    assert_success(&run);
    assert!(stderr(&run).contains("removed 2 partial checkpoint(s)"));
    assert!(
        names_in(&out).iter().all(|n| !n.contains("partial")),
        "{:?}",
        names_in(&out)
    );
}

#[test]
fn export_refuses_files_and_its_own_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let src = golden_dir("tiny-gqa");
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    let overwrite = |out: &Path| export(&src, out, &["--overwrite"]);
    assert_user_error(&overwrite(&file), "is not a directory; not replacing it");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    assert_eq!(names_in(tmp.path()), ["notes.txt"], "no hidden leftovers");
    // A directory of other things is not replaced either.
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "a").unwrap();
    assert_user_error(&overwrite(&docs), "holds files but no model");
    // Exporting a training checkpoint onto itself would drop its optimizer state.
    let out = tmp.path().join("run");
    assert_success(&sft(&out, &[]));
    let checkpoint = out.join("checkpoint-2");
    let run = export(&checkpoint, &checkpoint, &["--overwrite"]);
    assert_user_error(&run, "is the checkpoint itself");
    assert!(checkpoint.join("optimizer.bpk").exists());
}

#[test]
fn info_refuses_sizes_that_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("num_hidden_layers", "4294967296"),
        ("hidden_size", "4294967296"),
    ] {
        let text = std::fs::read_to_string(root().join("configs/llama2-7b.toml")).unwrap();
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        let path = tmp.path().join(format!("{key}.toml"));
        std::fs::write(&path, text.replace(line, &format!("{key} = {value}"))).unwrap();
        assert_user_error(
            &train(&["info", "--config", path.to_str().unwrap()]),
            "parameters",
        );
    }
}

#[test]
fn a_model_too_large_for_memory_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("huge.toml");
    let text = std::fs::read_to_string(root().join("configs/tiny-test.toml")).unwrap();
    // 2^38 parameters in the embedding alone: 1 TiB as f32.
    let text = text
        .replace("vocab_size = 512", "vocab_size = 4194304")
        .replace("hidden_size = 64", "hidden_size = 65536");
    std::fs::write(&config, text).unwrap();
    let set = format!("model.config=\"{}\"", config.display());
    let run = sft(&tmp.path().join("x"), &sets(&[&set]));
    assert_user_error(&run, "of memory is available");
}

#[test]
fn smaller_mistakes_get_clear_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Divergence before any checkpoint says so.
    let run = sft(
        &out,
        &sets(&[
            "train.lr=1e30",
            "train.grad_clip=1e30",
            "train.warmup_steps=0",
            "train.max_steps=50",
        ]),
    );
    assert_failed_with(&run, "no checkpoint had been saved yet");
    // A finished run resumed again: nothing to do, exit 0.
    let run = sft(&out, &["--overwrite"]);
    assert_success(&run);
    let again = sft(&out, &resume_latest(&[]));
    assert_success(&again);
    assert!(
        stderr(&again).contains("nothing to do"),
        "{}",
        stderr(&again)
    );
    // A resume that fails on the optimizer state leaves the run's recipe.toml as it was.
    let recipe = std::fs::read_to_string(out.join("recipe.toml")).unwrap();
    std::fs::write(out.join("checkpoint-2/optimizer.bpk"), b"garbage").unwrap();
    let run = sft(
        &out,
        &resume_latest(&["train.max_steps=4", "train.lr=1e-4"]),
    );
    assert_user_error(&run, "optimizer.bpk");
    assert_eq!(
        std::fs::read_to_string(out.join("recipe.toml")).unwrap(),
        recipe
    );
    // SFT says how many examples it truncated or dropped.
    let run = sft(
        &tmp.path().join("short"),
        &sets(&[
            "data.max_seq_len=100",
            "data.packing=false",
            "data.truncation=\"drop\"",
        ]),
    );
    assert_success(&run);
    assert!(
        stderr(&run).contains("dropped at max_seq_len 100"),
        "{}",
        stderr(&run)
    );
    // An empty system prompt is no system prompt.
    let prompt_ids = |extra: &[&str]| {
        let args = [
            "--prompt",
            "Hi",
            "--chat",
            "--json",
            "--max-new-tokens",
            "1",
        ];
        let run = generate(
            Path::new("tests/fixtures/golden/tiny-gqa"),
            &[&args[..], extra].concat(),
        );
        json_output(&run)["prompt_tokens"].clone()
    };
    assert_eq!(prompt_ids(&["--system", ""]), prompt_ids(&[]));
    assert_ne!(prompt_ids(&["--system", "Be brief."]), prompt_ids(&[]));
}
