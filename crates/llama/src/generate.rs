//! Batched, KV-cached text generation: greedy or temperature + top-p sampling, stopping at EOS.
//! The same engine serves `train generate` and PPO rollouts.

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::{finite_to_host, KvCache, Llama, Side, StepInput};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
    /// Generation of a sequence ends after this token (it is included in the output).
    pub eos_token_id: Option<u32>,
    /// Fed to finished rows of a batch and masked out; never attended to.
    pub pad_token_id: u32,
    /// Re-run the whole sequence at every step instead of using the KV cache (for checks and
    /// benchmarks only).
    pub use_cache: bool,
    /// Context length of the model: generation stops there.
    pub max_positions: usize,
    /// Only ids below this are generated: an embedding padded past its tokenizer has ids the
    /// tokenizer cannot decode. `None`: the whole vocabulary.
    pub vocab_limit: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_id: Some(2),
            pad_token_id: 0,
            use_cache: true,
            max_positions: usize::MAX,
            vocab_limit: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens only; ends with EOS when `stopped_at_eos`.
    pub tokens: Vec<u32>,
    pub stopped_at_eos: bool,
    /// Each token's log-probability under the distribution it was drawn from before the top-p
    /// cut: `softmax(logits / temperature)` over the first `vocab_limit` ids (temperature 1 when
    /// greedy). PPO's old log-probabilities, taken here instead of in another forward pass.
    pub logprobs: Vec<f64>,
    /// The entropy of that distribution at each token.
    pub entropies: Vec<f64>,
}

/// Generates continuations of every prompt in one batch. Prompts are left-padded so all rows
/// produce their next token at the same slot; positions count real tokens only, so each row
/// computes exactly what it would compute alone. NaN or infinite logits stop generation with
/// [`crate::LlamaError::NonFinite`].
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<Generated>> {
    let batch = prompts.len();
    if batch == 0 {
        return Ok(Vec::new());
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let budget = params
        .max_new_tokens
        .min(params.max_positions.saturating_sub(longest));
    let mut rng = StdRng::seed_from_u64(params.seed);

    let mut full = StepInput::padded(prompts, params.pad_token_id, Side::Left);

    let mut out: Vec<Generated> = (0..batch)
        .map(|_| Generated {
            tokens: Vec::new(),
            stopped_at_eos: false,
            logprobs: Vec::new(),
            entropies: Vec::new(),
        })
        .collect();
    if budget == 0 || longest == 0 {
        return Ok(out);
    }
    let mut next_position: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut cache = KvCache::new();
    let mut logits = if params.use_cache {
        last_logits(model, model.hidden_states(&full, Some(&mut cache)))?
    } else {
        last_logits(model, model.hidden_states(&full, None))?
    };
    let limit = params
        .vocab_limit
        .map_or(model.vocab_size(), |l| l.clamp(1, model.vocab_size()));

    let mut finished = vec![false; batch];
    for step in 0..budget {
        let mut step_tokens = Vec::with_capacity(batch);
        let mut step_valid = Vec::with_capacity(batch);
        // The draws in row order, as one stream; then the rows' distributions (a softmax over
        // the vocabulary each) in parallel.
        let draws: Vec<Option<f32>> = finished
            .iter()
            .map(|&done| (!done && params.temperature > 0.0).then(|| rng.random::<f32>()))
            .collect();
        let picks: Vec<Option<Picked>> = logits
            .par_iter()
            .zip(&finished)
            .zip(&draws)
            .map(|((row_logits, &done), &draw)| {
                (!done).then(|| pick_token(&row_logits[..limit], params, draw))
            })
            .collect();
        for (row, picked) in picks.into_iter().enumerate() {
            let Some(picked) = picked else {
                step_tokens.push(params.pad_token_id);
                step_valid.push(false);
                continue;
            };
            let token = picked.token;
            out[row].tokens.push(token);
            out[row].logprobs.push(picked.logprob);
            out[row].entropies.push(picked.entropy);
            if Some(token) == params.eos_token_id {
                finished[row] = true;
                out[row].stopped_at_eos = true;
            }
            step_tokens.push(token);
            step_valid.push(true);
        }
        if step + 1 == budget || finished.iter().all(|&f| f) {
            break;
        }
        let input = StepInput {
            tokens: step_tokens.iter().map(|&t| vec![t]).collect(),
            positions: next_position.iter().map(|&p| vec![p]).collect(),
            valid: step_valid.iter().map(|&v| vec![v]).collect(),
            segments: None,
        };
        for (row, &v) in step_valid.iter().enumerate() {
            if v {
                next_position[row] += 1;
            }
        }
        logits = if params.use_cache {
            last_logits(model, model.hidden_states(&input, Some(&mut cache)))?
        } else {
            for row in 0..batch {
                full.tokens[row].push(step_tokens[row]);
                full.valid[row].push(step_valid[row]);
            }
            full = StepInput::from_padded(full.tokens, full.valid, &vec![0; batch]);
            last_logits(model, model.hidden_states(&full, None))?
        };
    }
    Ok(out)
}

/// Next-token logits of the last slot of every row, on the host: `[batch][vocab]`. Only that
/// slot goes through the LM head, the largest matrix of a small model. Every row is checked
/// (finished rows too: their logits come from the same weights).
fn last_logits(model: &Llama, hidden: Tensor<3>) -> Result<Vec<Vec<f32>>> {
    let [batch, time, width] = hidden.dims();
    let last = hidden.slice([0..batch, time - 1..time, 0..width]);
    let vocab = model.vocab_size();
    let values = finite_to_host(model.lm_logits(last), "logits")?;
    Ok(values.chunks(vocab).map(<[f32]>::to_vec).collect())
}

/// A sampled token with its log-probability and the entropy of the distribution it came from.
struct Picked {
    token: u32,
    logprob: f64,
    entropy: f64,
}

/// The next token of one row: the argmax when greedy (`draw` is `None`), else a sample with
/// `draw` in [0, 1) as the random number.
fn pick_token(logits: &[f32], params: &SamplingParams, draw: Option<f32>) -> Picked {
    let greedy = params.temperature <= 0.0;
    let temperature = if greedy { 1.0 } else { params.temperature };
    let weights = Weights::of(logits, temperature);
    let token = match draw {
        Some(uniform) if !greedy => weights.sample(params.top_p, uniform),
        _ => argmax(logits),
    };
    // log p = z - ln Σ e^z and H = ln Σ e^z - Σ e^z z / Σ e^z, with z the shifted, scaled logits.
    let log_total = weights.total.ln();
    Picked {
        token,
        logprob: weights.scaled[token as usize] - log_total,
        entropy: log_total - weights.weighted_sum / weights.total,
    }
}

/// `softmax(logits / temperature)` unnormalised: `scaled[i] = (logits[i] - max) / temperature`,
/// `weights[i] = exp(scaled[i])`, their sum and `Σ weights[i] * scaled[i]`.
struct Weights {
    scaled: Vec<f64>,
    weights: Vec<f64>,
    total: f64,
    weighted_sum: f64,
}

impl Weights {
    fn of(logits: &[f32], temperature: f32) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scaled: Vec<f64> = logits
            .iter()
            .map(|&l| ((l - max) / temperature) as f64)
            .collect();
        let weights: Vec<f64> = scaled.iter().map(|z| z.exp()).collect();
        let total = weights.iter().sum();
        let weighted_sum = weights.iter().zip(&scaled).map(|(w, z)| w * z).sum();
        Self {
            scaled,
            weights,
            total,
            weighted_sum,
        }
    }

    /// Draws from the nucleus of mass `top_p` with `uniform` in [0, 1).
    fn sample(&self, top_p: f32, uniform: f32) -> u32 {
        let total = self.total;
        if top_p >= 1.0 {
            // The nucleus is the whole vocabulary: no need to sort.
            let mut target = uniform as f64 * total;
            for (index, &p) in self.weights.iter().enumerate() {
                if target < p {
                    return index as u32;
                }
                target -= p;
            }
            return self.weights.len().saturating_sub(1) as u32;
        }
        let mut probs: Vec<(usize, f64)> = self.weights.iter().copied().enumerate().collect();
        // Stable sort: equal probabilities keep index order, so sampling is reproducible.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0;
        let mut mass = 0.0;
        for (_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= top_p as f64 {
                break;
            }
        }
        let nucleus = &probs[..kept];
        let nucleus_mass: f64 = nucleus.iter().map(|p| p.1).sum();
        let mut target = uniform as f64 * nucleus_mass;
        for &(index, p) in nucleus {
            if target < p {
                return index as u32;
            }
            target -= p;
        }
        nucleus[kept - 1].0 as u32
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / temperature) restricted to the nucleus of mass `top_p`,
/// using `uniform` in [0, 1) as the random draw.
pub fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, uniform: f32) -> u32 {
    Weights::of(logits, temperature).sample(top_p, uniform)
}

#[cfg(test)]
mod tests {
    use super::{pick_token, sample_top_p, SamplingParams};
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_picked_token_carries_its_log_probability_and_the_entropy() {
        let logits = [0.0, 3.0f32.ln(), -1.0];
        let entropy = |p: &[f64]| -p.iter().map(|p| p * p.ln()).sum::<f64>();
        let softmax = |t: f64| {
            let w: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
            let total: f64 = w.iter().sum();
            w.iter().map(|w| w / total).collect::<Vec<f64>>()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        // Greedy: the likeliest token, under the distribution at temperature 1.
        let greedy = SamplingParams::default();
        let picked = pick_token(&logits, &greedy, None);
        let p = softmax(1.0);
        assert_eq!(picked.token, 1);
        assert!((picked.logprob - p[1].ln()).abs() < 1e-6);
        assert!((picked.entropy - entropy(&p)).abs() < 1e-6);
        // Sampled at temperature 0.5 with a nucleus: log-probability and entropy of the whole
        // distribution at that temperature, whichever token comes.
        let sampled = SamplingParams {
            temperature: 0.5,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        let p = softmax(0.5);
        for _ in 0..20 {
            let picked = pick_token(&logits, &sampled, Some(rng.random::<f32>()));
            assert!(picked.token < 2, "outside the nucleus: {}", picked.token);
            assert!((picked.logprob - p[picked.token as usize].ln()).abs() < 1e-6);
            assert!((picked.entropy - entropy(&p)).abs() < 1e-6);
        }
    }

    #[test]
    fn sampling_follows_the_probabilities_and_the_nucleus() {
        // Probabilities 0.25 and 0.75.
        let logits = [0.0, 3.0f32.ln()];
        assert_eq!(sample_top_p(&logits, 1.0, 1.0, 0.2), 0);
        assert_eq!(sample_top_p(&logits, 1.0, 1.0, 0.3), 1);
        // A nucleus of 0.5 keeps only the likelier token.
        assert_eq!(sample_top_p(&logits, 1.0, 0.5, 0.0), 1);
        assert_eq!(sample_top_p(&logits, 1.0, 0.5, 0.99), 1);
        // A low temperature sharpens: 0.25^2 / (0.25^2 + 0.75^2) = 0.1.
        assert_eq!(sample_top_p(&logits, 0.5, 1.0, 0.09), 0);
        assert_eq!(sample_top_p(&logits, 0.5, 1.0, 0.11), 1);
    }
}
