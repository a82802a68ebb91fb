//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

use burn::prelude::*;
use llama::model::to_host;

/// Every golden model, from both pinned transformers versions (their config.json layouts differ).
pub const GOLDEN_MODELS: [&str; 6] = [
    "tiny-gqa",
    "tiny-odd",
    "tiny-gqa-bf16-sharded",
    "golden-tf5/tiny-gqa",
    "golden-tf5/tiny-odd",
    "golden-tf5/tiny-gqa-bf16-sharded",
];

/// The device the tests run on: `LLAMA_TEST_DEVICE` (e.g. `tch:cpu`), flex by default.
pub fn test_device() -> Device {
    let name = test_support::test_device_name();
    llama::parse_device(&name).unwrap_or_else(|e| panic!("LLAMA_TEST_DEVICE: {e}"))
}

/// The `transformers` reference outputs saved beside golden model `name`.
pub fn load_golden(name: &str) -> llama::reference::Reference {
    llama::reference::Reference::load(&test_support::golden_dir(name)).expect("golden files")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of row `row`, positions `range`, as a flat host vector.
pub fn rows(logits: &Tensor<3>, row: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let [_, _, vocab] = logits.dims();
    to_host(logits.clone().slice([row..row + 1, range, 0..vocab]))
}
