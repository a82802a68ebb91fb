//! Helpers shared by the binary's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A golden model: a name under `tests/fixtures/golden/` (transformers 4.57.1), or a path under
/// `tests/fixtures/` such as `golden-tf5/tiny-odd` (transformers 5.x).
pub fn golden(name: &str) -> PathBuf {
    if name.contains('/') {
        root().join("tests/fixtures").join(name)
    } else {
        root().join("tests/fixtures/golden").join(name)
    }
}

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

/// A user mistake: non-zero exit, one line on stderr naming `needle`, no panic.
pub fn assert_user_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
}

/// An optional tool that scripts/test.sh found, named by `var`. Without it the check is skipped
/// with a reason, unless REQUIRE_TORCH=1 (CI), where it fails.
fn optional_tool(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var("REQUIRE_TORCH").as_deref() == Ok("1") => {
            panic!("REQUIRE_TORCH=1 but {var} is not set (run scripts/test.sh)")
        }
        _ => {
            eprintln!("skipped: {var} not set (scripts/test.sh sets it when {what})");
            None
        }
    }
}

/// The Python with `transformers` 4.57.1 (LLAMA_PYTHON).
pub fn python_with_transformers() -> Option<String> {
    optional_tool("LLAMA_PYTHON", ".venv has transformers")
}

/// The transformers 5.x overlay (LLAMA_TRANSFORMERS5), a PYTHONPATH entry used with
/// LLAMA_PYTHON.
pub fn transformers5_path() -> Option<String> {
    optional_tool("LLAMA_TRANSFORMERS5", ".venv/transformers5 exists")
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

pub fn losses_by_step(metrics: &[serde_json::Value]) -> Vec<(u64, f64)> {
    metrics
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

/// Runs `train <command> --recipe <recipe>` into `out`, on LLAMA_TEST_DEVICE when set (flex by
/// default); returns the process output and the lines of metrics.jsonl.
pub fn run_recipe(
    command: &str,
    recipe: &str,
    out: &Path,
    extra: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let dir = format!("output.dir=\"{}\"", out.display());
    let device = format!(
        "runtime.device=\"{}\"",
        std::env::var("LLAMA_TEST_DEVICE").unwrap_or_else(|_| "flex".into())
    );
    let mut args = vec![command, "--recipe", recipe, "--set", &dir, "--set", &device];
    args.extend_from_slice(extra);
    let run = train(&args);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (run, metrics)
}

/// `../shared` beside the repository. Absent in a user's clone: the test is skipped with a
/// reason, unless REQUIRE_SHARED=1 (CI), where it fails.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = root().join("../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("REQUIRE_SHARED=1 but {} is missing", dir.display());
    }
    eprintln!(
        "skipped: {} not found (set REQUIRE_SHARED=1 to fail instead)",
        dir.display()
    );
    None
}

/// A failure after some progress output: non-zero exit, no panic, and the last line of stderr
/// is the error naming `needle`.
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
