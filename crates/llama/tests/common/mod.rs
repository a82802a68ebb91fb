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

pub struct Golden {
    pub sequences: Vec<Vec<u32>>,
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<(Vec<u32>, Vec<u32>)>,
    pub max_new_tokens: usize,
}

pub fn load_golden(name: &str) -> Golden {
    let dir = test_support::golden_dir(name);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
    )
    .expect("golden.json parses");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("id list")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let sequences: Vec<Vec<u32>> = json["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .map(ids)
        .collect();
    let greedy = json["greedy"]
        .as_array()
        .expect("greedy")
        .iter()
        .map(|g| (ids(&g["prompt_ids"]), ids(&g["new_tokens"])))
        .collect();
    let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let logits = (0..sequences.len())
        .map(|i| {
            let view = tensors.tensor(&format!("logits_{i}")).expect("logits_i");
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect();
    Golden {
        sequences,
        logits,
        greedy,
        max_new_tokens: json["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
    }
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
