//! Helpers shared by the binary's integration tests: running `train` and checking how it ends.
//! The generic ones (paths, fixtures, `../shared`, optional Python tools) are in the
//! `test-support` crate.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use test_support::{parse_jsonl, root, test_device_name};

/// Runs the `train` binary in the repository root, so that relative paths in `args` and in the
/// recipes resolve as they do for a user in a fresh clone.
pub fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run train")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A run that must succeed; its stderr is the failure message otherwise.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

/// The whole stdout of a successful `--json` run, parsed as one JSON value.
#[track_caller]
pub fn json_output(out: &Output) -> serde_json::Value {
    assert_success(out);
    serde_json::from_str(stdout(out).trim()).unwrap()
}

/// The last line of stdout of a successful run, parsed as JSON: the summary a training command
/// prints after its progress output.
#[track_caller]
pub fn json_summary(out: &Output) -> serde_json::Value {
    assert_success(out);
    serde_json::from_str(stdout(out).lines().last().expect("a JSON line")).unwrap()
}

/// A user mistake: non-zero exit, one line on stderr naming `needle`, no panic. A trainer's
/// memory plan, said once its model has loaded, may precede it.
#[track_caller]
pub fn assert_user_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    let lines: Vec<&str> = err
        .trim()
        .lines()
        .filter(|l| !l.starts_with("memory plan: "))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
}

/// A failure after some progress output: non-zero exit, no panic, and the last line of stderr
/// is the error naming `needle`.
#[track_caller]
pub fn assert_failed_with(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "expected `{needle}` in the last line: {err}"
    );
}

/// `--set` before each of `overrides`: the arguments that change a recipe's values.
pub fn sets<'a>(overrides: &[&'a str]) -> Vec<&'a str> {
    overrides.iter().flat_map(|o| ["--set", *o]).collect()
}

/// `--resume latest`, then `overrides` as [`sets`]: the arguments that continue a run.
pub fn resume_latest<'a>(overrides: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--resume", "latest"];
    args.extend(sets(overrides));
    args
}

/// The path as an argument of `train` (the tests' paths are UTF-8).
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// `train generate --model <model>` followed by `args`.
pub fn generate(model: &Path, args: &[&str]) -> Output {
    train(&[&["generate", "--model", arg(model)][..], args].concat())
}

/// `train export --checkpoint <checkpoint> --out <out>` followed by `args`.
pub fn export(checkpoint: &Path, out: &Path, args: &[&str]) -> Output {
    let paths = ["--checkpoint", arg(checkpoint), "--out", arg(out)];
    train(&[&["export"][..], &paths, args].concat())
}

/// `train score --model <model> --data <data>` followed by `args`.
pub fn score(model: &Path, data: &Path, args: &[&str]) -> Output {
    let paths = ["--model", arg(model), "--data", arg(data)];
    train(&[&["score"][..], &paths, args].concat())
}

/// `train eval safety --model <model> --prompts <prompts>` followed by `args`.
pub fn eval_safety(model: &Path, prompts: &Path, args: &[&str]) -> Output {
    let paths = ["--model", arg(model), "--prompts", arg(prompts)];
    train(&[&["eval", "safety"][..], &paths, args].concat())
}

/// Runs `python scripts/<script> args...` and fails with its output unless it succeeds.
pub fn assert_python_check(python: &str, script: &str, args: &[&Path]) {
    let check = Command::new(python)
        .arg(test_support::root().join("scripts").join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        check.status.success(),
        "{script}: {} {}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// (step, loss) of the metrics lines that have both.
pub fn losses_by_step(metrics: &[serde_json::Value]) -> Vec<(u64, f64)> {
    metrics
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

/// A copy of the fixture recipe `recipe` (relative to the root, under `tests/fixtures/recipes`,
/// starting from `model.config`) written into `dir` with `model.checkpoint = checkpoint` in its
/// place and its other paths made absolute; returns its path as an argument.
pub fn recipe_from_checkpoint(recipe: &str, checkpoint: &Path, dir: &Path) -> String {
    let text = std::fs::read_to_string(root().join(recipe)).unwrap();
    let text = text
        .replace(
            "config = \"../../../configs/tiny-test.toml\"",
            &format!("checkpoint = \"{}\"", checkpoint.display()),
        )
        .replace("../../../", &format!("{}/", root().display()))
        .replace(
            "../tokenizer/",
            &format!("{}/tokenizer/", test_support::fixtures().display()),
        );
    assert!(
        text.contains("checkpoint = "),
        "{recipe} starts from model.config"
    );
    let name = Path::new(recipe).file_name().unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().expect("a UTF-8 path").to_string()
}

/// Runs `train <command> --recipe <recipe>` into `out`, on LLAMA_TEST_DEVICE when set (flex by
/// default); returns the process output and the lines of metrics.jsonl (none if it has none).
pub fn run_recipe(
    command: &str,
    recipe: &str,
    out: &Path,
    extra: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let dir = format!("output.dir=\"{}\"", out.display());
    let device = format!("runtime.device=\"{}\"", test_device_name());
    let mut args = vec![command, "--recipe", recipe];
    args.extend(sets(&[&dir, &device]));
    args.extend_from_slice(extra);
    let run = train(&args);
    let metrics =
        parse_jsonl(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default());
    (run, metrics)
}

/// The files in `dir` (relative to the repository root) whose names end with one of
/// `extensions`, sorted.
pub fn recipe_files(dir: &str, extensions: &[&str]) -> Vec<std::path::PathBuf> {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            extensions.iter().any(|e| name.ends_with(e))
        })
        .collect();
    found.sort();
    found
}

/// Reads a recipe as the command whose method section is `S` does; `Ok` or the one-line error.
pub fn load_recipe<S: trainer::Section>(file: &Path) -> Result<(), String> {
    let set = ["train.seed=3".to_string()];
    trainer::Recipe::load_with::<S>(file, &set)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
