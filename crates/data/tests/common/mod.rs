//! Helpers shared by the data crate's tests; the generic ones (paths, `../shared`) are in the
//! `test-support` crate.

pub fn fixture_tokenizer() -> data::Tokenizer {
    data::Tokenizer::from_file(&test_support::fixture_tokenizer_path()).expect("fixture tokenizer")
}
