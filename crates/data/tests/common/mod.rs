//! Helpers shared by the data crate's tests.

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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

pub fn fixture_tokenizer() -> data::Tokenizer {
    data::Tokenizer::from_file(&root().join("tests/fixtures/tokenizer/tokenizer.json"))
        .expect("fixture tokenizer")
}
