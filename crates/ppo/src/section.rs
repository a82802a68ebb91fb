//! `[ppo]`: RLHF with PPO (Llama 2, section 3.2.3). `[train]` holds the optimizer settings,
//! `batch_size` = prompts per iteration, `micro_batch_size` = prompts per PPO mini-batch (one
//! gradient step each), `max_steps` = iterations.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How an iteration turns rewards into advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// Generalised advantage estimation with a value model (PPO as in Llama 2).
    #[default]
    Gae,
    /// Group-relative (Shao et al., 2024): `(r - mean) / (std + 1e-4)` over the `group_size`
    /// answers to the same prompt, for every token of an answer. No value model.
    Grpo,
    /// REINFORCE leave-one-out (Ahmadian et al., 2024): `r` minus the mean of the other answers
    /// to the same prompt, for every token. No value model.
    Rloo,
}

/// Where the KL to the reference enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlPenalty {
    /// `-β · KL` in the reward (per token for GAE; summed over the answer for GRPO/RLOO).
    Reward,
    /// `β · KL` as a term of the policy loss, with the per-token estimator
    /// `exp(ρ - π) - (ρ - π) - 1` (GRPO's).
    Loss,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// `gae` (with a value model), `grpo` or `rloo` (critic-free, `group_size` answers per
    /// prompt).
    #[serde(default)]
    pub estimator: Estimator,
    /// Answers sampled per prompt; at least 2 for `grpo` and `rloo`.
    #[serde(default = "one_pass")]
    pub group_size: usize,
    /// Where the KL penalty goes: by default the reward for `gae` and `rloo`, the loss for
    /// `grpo`.
    #[serde(default)]
    pub kl_penalty: Option<KlPenalty>,
    /// The helpfulness reward model (or the only one).
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    /// The safety reward model; with both, the Llama 2 rule picks one score per prompt.
    #[serde(default)]
    pub safety_reward_model: Option<PathBuf>,
    /// Use the safety score when sigmoid(safety score) is below this, or the prompt's category
    /// is `safety`.
    #[serde(default = "default_safety_threshold")]
    pub safety_threshold: f64,
    /// Initial value model; by default the (helpfulness, else safety) reward model.
    #[serde(default)]
    pub value_model: Option<PathBuf>,
    /// Learning rate of the value model (default: `train.lr`).
    #[serde(default)]
    pub value_lr: Option<f64>,
    /// Normalise each reward model's score with the mean and std saved with it.
    #[serde(default)]
    pub normalize_reward: bool,
    /// Whiten the combined reward over the batch, as the paper does.
    #[serde(default = "yes")]
    pub whiten_reward: bool,
    /// Clip the (whitened) reward to `[-reward_clip, reward_clip]`.
    #[serde(default)]
    pub reward_clip: Option<f64>,
    /// Subtracted from the reward of responses that hit `max_new_tokens` without EOS.
    #[serde(default)]
    pub no_eos_penalty: f64,
    /// Re-tokenize text for reward models whose tokenizer differs from the policy's.
    #[serde(default)]
    pub retokenize: bool,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// Prompts answered at a time (their KV cache is what generation holds); the whole
    /// iteration's batch when absent.
    #[serde(default)]
    pub generation_batch: Option<usize>,
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    /// β of the per-token KL penalty (the initial β when adaptive).
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// Adapt β toward this KL per sequence (Ziegler et al.); fixed β when absent.
    #[serde(default)]
    pub target_kl: Option<f64>,
    #[serde(default = "default_kl_horizon")]
    pub kl_horizon: usize,
    /// Stop the run when the mean KL per sequence exceeds this.
    #[serde(default = "default_max_kl")]
    pub max_kl: f64,
    #[serde(default = "one")]
    pub gamma: f64,
    #[serde(default = "default_lambda")]
    pub lam: f64,
    #[serde(default = "default_clip")]
    pub clip_range: f64,
    #[serde(default = "default_clip")]
    pub value_clip_range: f64,
    #[serde(default = "default_value_coef")]
    pub value_coef: f64,
    /// Rollouts per gradient step of the update (PPO's mini-batch); `train.micro_batch_size`
    /// when absent. Each mini-batch goes through the models `train.micro_batch_size` rollouts at
    /// a time, its gradients accumulated, so the mini-batch is an algorithm setting and the
    /// micro-batch a memory one.
    #[serde(default)]
    pub mini_batch_size: Option<usize>,
    /// Passes over each rollout batch.
    #[serde(default = "one_pass")]
    pub ppo_epochs: usize,
    /// Write sampled prompt/response pairs every this many iterations (0: never).
    #[serde(default = "one_pass")]
    pub sample_every: usize,
    #[serde(default = "default_samples")]
    pub samples: usize,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn one_pass() -> usize {
    1
}
fn default_safety_threshold() -> f64 {
    0.15
}
fn default_new_tokens() -> usize {
    64
}
fn default_kl_coef() -> f64 {
    0.01
}
fn default_kl_horizon() -> usize {
    10_000
}
fn default_max_kl() -> f64 {
    100.0
}
fn default_lambda() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_value_coef() -> f64 {
    0.1
}
fn default_samples() -> usize {
    4
}

impl PpoSection {
    /// Whether the estimator needs a value model (GAE).
    pub fn has_value_model(&self) -> bool {
        self.estimator == Estimator::Gae
    }

    /// Where the KL penalty goes, the estimator's default when unset.
    pub fn kl_penalty(&self) -> KlPenalty {
        self.kl_penalty.unwrap_or(match self.estimator {
            Estimator::Grpo => KlPenalty::Loss,
            Estimator::Gae | Estimator::Rloo => KlPenalty::Reward,
        })
    }
}

impl trainer::Section for PpoSection {
    const NAME: &'static str = "ppo";

    fn resolve_paths(&mut self, resolve: &mut dyn FnMut(&mut PathBuf)) {
        for path in [
            &mut self.reward_model,
            &mut self.safety_reward_model,
            &mut self.value_model,
        ]
        .into_iter()
        .flatten()
        {
            resolve(path);
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.reward_model.is_none() && self.safety_reward_model.is_none() {
            return Err("[ppo] needs `reward_model` or `safety_reward_model`".into());
        }
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !(unit(self.gamma) && unit(self.lam) && unit(self.safety_threshold)) {
            return Err("[ppo] `gamma`, `lam` and `safety_threshold` must be within [0, 1]".into());
        }
        if !(self.clip_range > 0.0 && self.value_clip_range > 0.0 && self.kl_coef >= 0.0) {
            return Err(
                "[ppo] `clip_range` and `value_clip_range` must be positive, `kl_coef` >= 0".into(),
            );
        }
        if self.max_new_tokens == 0 || self.ppo_epochs == 0 {
            return Err("[ppo] `max_new_tokens` and `ppo_epochs` must be positive".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0 && self.temperature > 0.0) {
            return Err(
                "[ppo] `top_p` must be in (0, 1] and `temperature` > 0 (PPO samples)".into(),
            );
        }
        if self.target_kl.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
            return Err("[ppo] `target_kl` must be positive".into());
        }
        if self.group_size == 0 {
            return Err("[ppo] `group_size` must be >= 1".into());
        }
        if self.estimator != Estimator::Gae && self.group_size < 2 {
            return Err(format!(
                "[ppo] `group_size` must be >= 2 for estimator = \"{}\" (its baseline is the \
                 other answers to the same prompt), not {}",
                if self.estimator == Estimator::Grpo {
                    "grpo"
                } else {
                    "rloo"
                },
                self.group_size
            ));
        }
        if self.estimator != Estimator::Gae && self.value_model.is_some() {
            return Err(
                "[ppo] `value_model` is for estimator = \"gae\"; grpo and rloo use none".into(),
            );
        }
        if self.generation_batch == Some(0) || self.mini_batch_size == Some(0) {
            return Err("[ppo] `generation_batch` and `mini_batch_size` must be >= 1".into());
        }
        Ok(())
    }
}
