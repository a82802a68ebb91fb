//! Helpers shared by the workspace's tests: where the repository and its fixtures are, the
//! optional `../shared` data and Python tools (skipped with a reason, or failing in CI), and small
//! file helpers.
//!
//! Dev-only, and on purpose std and serde_json only: a dependency on burn or on a workspace
//! crate here would change the dev-dependency feature unification and rebuild burn. Helpers that
//! need the model's or the data pipeline's types stay in each crate's `tests/common/`.

use std::path::{Path, PathBuf};

/// The fixture tokenizer (byte-level BPE, 512 tokens) relative to the root: the `train` binary
/// runs in the root in the CLI tests, so this is the form its arguments take.
pub const FIXTURE_TOKENIZER: &str = "tests/fixtures/tokenizer/tokenizer.json";

/// The real Llama 2 tokenizer relative to [`shared_dir`], for the tests on real data.
pub const LLAMA2_TOKENIZER: &str = "tokenizers/llama2/tokenizer.json";

/// The repository root, so that tests find `configs/`, `datasets/`, `recipes/` and
/// `tests/fixtures/` wherever cargo runs them from (this crate sits two levels below it, like
/// every crate of the workspace).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures/`: the committed tokenizer, golden models and test recipes.
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A golden model: a name under `tests/fixtures/golden/` (made with transformers 4.57.1), or a
/// path under `tests/fixtures/` such as `golden-tf5/tiny-odd` (made with transformers 5.x).
pub fn golden_dir(name: &str) -> PathBuf {
    if name.contains('/') {
        fixtures().join(name)
    } else {
        fixtures().join("golden").join(name)
    }
}

/// The fixture tokenizer's full path, for tests that load it themselves.
pub fn fixture_tokenizer_path() -> PathBuf {
    root().join(FIXTURE_TOKENIZER)
}

/// `configs/tiny-test.toml`, the tiny architecture (512-token vocabulary) most model tests build.
pub fn tiny_test_config() -> PathBuf {
    root().join("configs/tiny-test.toml")
}

/// `../shared` beside the repository (the real tokenizer and data sets). Absent in a user's
/// clone: the test is skipped with a reason, unless REQUIRE_SHARED=1 (CI), where it fails.
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

/// The device the model tests run on, by name: LLAMA_TEST_DEVICE (e.g. `tch:cpu`, which
/// scripts/test.sh sets for its second pass), `flex` by default. Parsing it needs llama, so that
/// stays with the tests.
pub fn test_device_name() -> String {
    std::env::var("LLAMA_TEST_DEVICE").unwrap_or_else(|_| "flex".into())
}

/// An optional tool that scripts/test.sh found, named by the environment variable `var`; `what`
/// says when test.sh sets it. Without it the check is skipped with a reason, unless
/// REQUIRE_TORCH=1 (CI), where it fails.
pub fn optional_tool(var: &str, what: &str) -> Option<String> {
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

/// The Python with `transformers` 4.57.1 (LLAMA_PYTHON), for the checks against Hugging Face.
pub fn python_with_transformers() -> Option<String> {
    optional_tool("LLAMA_PYTHON", ".venv has transformers")
}

/// The transformers 5.x overlay (LLAMA_TRANSFORMERS5): a PYTHONPATH entry used with
/// LLAMA_PYTHON, so that the same checks also run in 5.x.
pub fn transformers5_path() -> Option<String> {
    optional_tool("LLAMA_TRANSFORMERS5", ".venv/transformers5 exists")
}

/// Copies the directory `from` into `to`, subdirectories included: a fixture or a run to change
/// without touching the original.
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

/// The JSON objects of JSON Lines text (metrics, samples, candidates); a line that is not JSON
/// fails the test.
pub fn parse_jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}: {line:?}", i + 1))
        })
        .collect()
}

/// The JSON objects of a JSON Lines file; a missing file or a line that is not JSON fails the
/// test.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_jsonl(&text)
}

/// Rewrites the JSON file `path` (a config.json or tokenizer.json of a fixture copy) with
/// `edit` applied: the way tests make a model or tokenizer subtly wrong.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

/// Swaps the ids of tokens `a` and `b` in a Hugging Face tokenizer.json value: a tokenizer of
/// the same size with a different vocabulary, which size checks alone cannot tell apart.
pub fn swap_token_ids(tokenizer: &mut serde_json::Value, a: &str, b: &str) {
    let vocab = tokenizer["model"]["vocab"]
        .as_object_mut()
        .expect("a tokenizer.json with model.vocab");
    let (ia, ib) = (vocab[a].clone(), vocab[b].clone());
    vocab.insert(a.into(), ib);
    vocab.insert(b.into(), ia);
}

/// A JSON array of integers (token ids) as numbers; anything else there fails the test.
pub fn json_u64s(array: &serde_json::Value) -> Vec<u64> {
    json_items(array, "an id", serde_json::Value::as_u64)
}

/// A JSON array of numbers (scores) as f64; anything else there fails the test.
pub fn json_f64s(array: &serde_json::Value) -> Vec<f64> {
    json_items(array, "a number", serde_json::Value::as_f64)
}

fn json_items<T>(
    array: &serde_json::Value,
    what: &str,
    get: impl Fn(&serde_json::Value) -> Option<T>,
) -> Vec<T> {
    let items = array
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {array}"));
    items
        .iter()
        .map(|v| get(v).unwrap_or_else(|| panic!("not {what}: {v}")))
        .collect()
}
