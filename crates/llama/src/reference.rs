//! Checks a model on any device against outputs that `transformers` computed for it: the
//! reference files `golden.json` (token sequences, greedy continuations) and
//! `golden.safetensors` (f32 logits) that `scripts/make_golden.py` writes beside a checkpoint.
//! `train verify` runs these checks, so a new device (a GPU the test suite never saw) can be
//! held to the same standard as the golden tests.

use std::path::Path;

use burn::tensor::{FloatDType, Tensor};

use crate::error::{LlamaError, Result};
use crate::model::{cast_weights, to_host};
use crate::{generate, KvCache, Llama, RopeScaling, SamplingParams, StepInput};

/// The largest logit difference from `transformers` accepted in f32.
pub const F32_TOLERANCE: f32 = 1e-4;

/// bf16 keeps 8 significant bits, so its logits are as far off as `transformers`' own bf16
/// forward pass is from its f32 logits (4.57.1, CPU): measured per reference model. Models not
/// listed get no bf16 check.
const BF16_TOLERANCE: [(&str, f32); 2] = [("tiny-gqa", 0.65), ("tiny-odd", 0.84)];

/// Reference outputs of one model.
pub struct Reference {
    /// The model's name in `golden.json` (`tiny-gqa`, ...).
    pub model: String,
    pub sequences: Vec<Vec<u32>>,
    /// f32 logits of each sequence, `[len, vocab]` flattened.
    pub logits: Vec<Vec<f32>>,
    /// Greedy continuations: (prompt, new tokens up to and including EOS).
    pub greedy: Vec<(Vec<u32>, Vec<u32>)>,
    pub max_new_tokens: usize,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl Reference {
    /// Reads `dir/golden.json` and `dir/golden.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json_path = dir.join("golden.json");
        let text = std::fs::read_to_string(&json_path).map_err(|error| LlamaError::Io {
            path: json_path.clone(),
            error,
        })?;
        let bad = |message: String| LlamaError::Config {
            path: json_path.clone(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let ids = |v: &serde_json::Value, field: &str| -> Result<Vec<u32>> {
            v.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                        .collect::<Option<Vec<u32>>>()
                })
                .ok_or_else(|| bad(format!("`{field}` is not a list of token ids")))
        };
        let list = |field: &str| -> Result<&Vec<serde_json::Value>> {
            json[field]
                .as_array()
                .ok_or_else(|| bad(format!("`{field}` is missing or not a list")))
        };
        let number = |field: &str| -> Result<u64> {
            json[field]
                .as_u64()
                .ok_or_else(|| bad(format!("`{field}` is missing or not a number")))
        };
        let sequences = list("sequences")?
            .iter()
            .map(|s| ids(s, "sequences"))
            .collect::<Result<Vec<_>>>()?;
        let greedy = list("greedy")?
            .iter()
            .map(|g| {
                Ok((
                    ids(&g["prompt_ids"], "prompt_ids")?,
                    ids(&g["new_tokens"], "new_tokens")?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let id = |field: &str| -> Result<u32> {
            u32::try_from(number(field)?).map_err(|_| bad(format!("`{field}` is out of range")))
        };
        let logits = read_logits(&dir.join("golden.safetensors"), &sequences)?;
        Ok(Reference {
            model: json["model"].as_str().unwrap_or("").to_string(),
            max_new_tokens: number("max_new_tokens")? as usize,
            eos_token_id: id("eos_token_id")?,
            pad_token_id: id("pad_token_id")?,
            sequences,
            logits,
            greedy,
        })
    }

    /// The bf16 tolerance measured for this reference model, if any.
    pub fn bf16_tolerance(&self) -> Option<f32> {
        BF16_TOLERANCE
            .iter()
            .find(|(name, _)| *name == self.model)
            .map(|(_, tolerance)| *tolerance)
    }
}

/// `logits_I` for each sequence I, checked against its length.
fn read_logits(path: &Path, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).map_err(|error| LlamaError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let bad = |message: String| LlamaError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    sequences
        .iter()
        .enumerate()
        .map(|(i, seq)| {
            let name = format!("logits_{i}");
            let view = tensors
                .tensor(&name)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            let shape = view.shape();
            if view.dtype() != safetensors::Dtype::F32 || shape.len() != 2 || shape[0] != seq.len()
            {
                return Err(bad(format!(
                    "{name}: expected f32 [{}, vocab], found {:?} {shape:?}",
                    seq.len(),
                    view.dtype()
                )));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        })
        .collect()
}

/// One comparison: the worst difference measured and the largest allowed (for greedy tokens,
/// the number of continuations that differ, allowed 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub measured: f64,
    pub limit: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.measured <= self.limit
    }
}

/// Runs every check of `reference` on `model` (loaded from the reference's checkpoint, in f32):
/// logits of each sequence; the same through the KV cache a token at a time; a batch mixing
/// left, right and two-sided padding; greedy continuations alone and batched, with and without
/// the cache; and, where a bf16 tolerance is known, the logits with bf16 weights
/// (`bf16_logits`) and with bf16 compute over f32 weights (`bf16_mixed_logits`).
pub fn verify(model: &Llama, reference: &Reference) -> Result<Vec<Check>> {
    let vocab = model.vocab_size();
    let token_lists = reference
        .sequences
        .iter()
        .chain(reference.greedy.iter().map(|(prompt, _)| prompt));
    for tokens in token_lists {
        if tokens.is_empty() || tokens.iter().any(|&id| id as usize >= vocab) {
            return Err(LlamaError::Invalid(format!(
                "a reference sequence is empty or holds ids outside the vocabulary of {vocab}: \
                 {tokens:?}"
            )));
        }
    }
    if reference
        .logits
        .iter()
        .zip(&reference.sequences)
        .any(|(l, s)| l.len() != s.len() * vocab)
    {
        return Err(LlamaError::Invalid(format!(
            "the reference logits are not over this model's vocabulary of {vocab}"
        )));
    }
    let tolerance = F32_TOLERANCE as f64;
    // Dynamic RoPE scaling depends on the length of each pass by design: a token at a time
    // through the cache, or in a batch padded to a longer row, it computes other numbers than
    // one pass over the sequence alone (in `transformers` too). Only what both compute the same
    // way is compared: whole sequences alone, and greedy generation alone with the cache.
    let per_pass = matches!(model.rope.scaling, Some(RopeScaling::Dynamic { .. }));
    let mut checks = vec![Check {
        name: "logits",
        measured: logits_diff(model, reference) as f64,
        limit: tolerance,
    }];
    if !per_pass {
        checks.push(Check {
            name: "kv_cache",
            measured: kv_cache_diff(model, reference) as f64,
            limit: tolerance,
        });
        checks.push(Check {
            name: "mixed_padding",
            measured: padded_diff(model, reference) as f64,
            limit: tolerance,
        });
    }
    checks.push(Check {
        name: "greedy_tokens",
        measured: greedy_mismatches(model, reference, per_pass)? as f64,
        limit: 0.0,
    });
    if let Some(limit) = reference.bf16_tolerance() {
        let bf16 = cast_weights(model.clone(), FloatDType::BF16);
        let mixed = Llama {
            compute_dtype: Some(FloatDType::BF16),
            ..model.clone()
        };
        checks.push(Check {
            name: "bf16_logits",
            measured: logits_diff(&bf16, reference) as f64,
            limit: limit as f64,
        });
        checks.push(Check {
            name: "bf16_mixed_logits",
            measured: logits_diff(&mixed, reference) as f64,
            limit: limit as f64,
        });
    }
    Ok(checks)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    // NaN compares false with everything: count it as an infinite difference.
    a.iter().zip(b).fold(0.0, |worst, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            worst.max(d)
        }
    })
}

/// Logits of row `row`, positions `range`, as a flat host vector.
fn rows(logits: &Tensor<3>, row: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let [_, _, vocab] = logits.dims();
    to_host(logits.clone().slice([row..row + 1, range, 0..vocab]))
}

fn logits_diff(model: &Llama, reference: &Reference) -> f32 {
    reference
        .sequences
        .iter()
        .zip(&reference.logits)
        .map(|(seq, expected)| {
            let logits = model.logits(std::slice::from_ref(seq));
            max_abs_diff(&rows(&logits, 0, 0..seq.len()), expected)
        })
        .fold(0.0, f32::max)
}

/// The longest sequence fed as a 3-token prefix, then one token at a time through the cache.
fn kv_cache_diff(model: &Llama, reference: &Reference) -> f32 {
    let Some((seq, expected)) = reference
        .sequences
        .iter()
        .zip(&reference.logits)
        .max_by_key(|(seq, _)| seq.len())
    else {
        return 0.0;
    };
    let prefix = seq.len().min(3);
    let mut cache = KvCache::new();
    let mut got = Vec::new();
    let mut start = 0;
    for chunk in [&seq[..prefix]].into_iter().chain(seq[prefix..].chunks(1)) {
        let input = StepInput::from_padded(
            vec![chunk.to_vec()],
            vec![vec![true; chunk.len()]],
            &[start],
        );
        let logits = model.forward(&input, Some(&mut cache));
        got.extend(rows(&logits, 0, 0..chunk.len()));
        start += chunk.len();
    }
    max_abs_diff(&got, expected)
}

/// All sequences in one batch two tokens wider than the longest: row 0 left-padded, row 1
/// right-padded, the rest padded on both sides.
fn padded_diff(model: &Llama, reference: &Reference) -> f32 {
    let Some(longest) = reference.sequences.iter().map(Vec::len).max() else {
        return 0.0;
    };
    let width = longest + 2;
    let pad = reference.pad_token_id;
    let (mut tokens, mut valid, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, seq) in reference.sequences.iter().enumerate() {
        let free = width - seq.len();
        let left = match i {
            0 => free,
            1 => 0,
            _ => free / 2,
        };
        let mut row = vec![pad; left];
        row.extend(seq);
        row.resize(width, pad);
        let mut mask = vec![false; left];
        mask.extend(vec![true; seq.len()]);
        mask.resize(width, false);
        tokens.push(row);
        valid.push(mask);
        offsets.push(left);
    }
    let starts = vec![0; tokens.len()];
    let logits = model.forward(&StepInput::from_padded(tokens, valid, &starts), None);
    reference
        .sequences
        .iter()
        .zip(&reference.logits)
        .enumerate()
        .map(|(i, (seq, expected))| {
            max_abs_diff(
                &rows(&logits, i, offsets[i]..offsets[i] + seq.len()),
                expected,
            )
        })
        .fold(0.0, f32::max)
}

/// Greedy continuations that differ from the reference's, over four ways of generating them
/// (alone and batched, with and without the cache); `cached_alone`: only alone with the cache,
/// the way the reference was generated.
fn greedy_mismatches(model: &Llama, reference: &Reference, cached_alone: bool) -> Result<usize> {
    let prompts: Vec<Vec<u32>> = reference.greedy.iter().map(|g| g.0.clone()).collect();
    let mut mismatches = 0;
    let cache_modes: &[bool] = if cached_alone {
        &[true]
    } else {
        &[true, false]
    };
    for &use_cache in cache_modes {
        let params = SamplingParams {
            max_new_tokens: reference.max_new_tokens,
            temperature: 0.0,
            eos_token_id: Some(reference.eos_token_id),
            pad_token_id: reference.pad_token_id,
            use_cache,
            ..SamplingParams::default()
        };
        for (prompt, expected) in &reference.greedy {
            let out = generate(model, std::slice::from_ref(prompt), &params)?;
            mismatches += usize::from(out.first().map(|g| &g.tokens) != Some(expected));
        }
        if cached_alone {
            continue;
        }
        let out = generate(model, &prompts, &params)?;
        mismatches += reference
            .greedy
            .iter()
            .zip(
                out.iter()
                    .map(|g| &g.tokens)
                    .chain(std::iter::repeat(&Vec::new())),
            )
            .filter(|((_, expected), got)| expected != *got)
            .count();
    }
    Ok(mismatches)
}
