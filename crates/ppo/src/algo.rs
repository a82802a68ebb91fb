//! The arithmetic of PPO, as plain functions tested against hand-computed numbers: the reward
//! rule and the shaping of sequence rewards, whitening, per-token rewards with the KL penalty,
//! GAE and the batch's advantages, the clipped losses and the KL controller.

use burn::prelude::*;

use crate::section::PpoSection;

/// Which reward model's score a prompt gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardSource {
    Helpfulness,
    Safety,
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The Llama 2 rule: R_c = R_s if the prompt is a safety prompt or R_s < threshold, else R_h,
/// where R = sigmoid(score) is a reward model's output as a probability. Returns logit(R_c),
/// which is the chosen model's raw score (logit undoes the sigmoid), and which model it came
/// from. With one model, its score.
pub fn combine_reward(
    helpfulness: Option<f64>,
    safety: Option<f64>,
    is_safety_prompt: bool,
    threshold: f64,
) -> (f64, RewardSource) {
    match (helpfulness, safety) {
        (Some(h), None) => (h, RewardSource::Helpfulness),
        (None, Some(s)) => (s, RewardSource::Safety),
        (Some(h), Some(s)) => {
            if is_safety_prompt || sigmoid(s) < threshold {
                (s, RewardSource::Safety)
            } else {
                (h, RewardSource::Helpfulness)
            }
        }
        (None, None) => (0.0, RewardSource::Helpfulness),
    }
}

/// One reward model's scores of a batch: raw (what the reward rule compares) and as rewarded
/// (normalised with the mean and std saved with the model, when `normalize_reward`).
#[derive(Debug, Clone)]
pub struct ModelScores {
    pub raw: Vec<f64>,
    pub rewarded: Vec<f64>,
}

/// The sequence reward of each rollout.
#[derive(Debug, Clone)]
pub struct Rewards {
    /// The chosen model's (normalised) score: what is reported.
    pub combined: Vec<f64>,
    pub sources: Vec<RewardSource>,
    /// What PPO optimises: `combined` whitened over the batch (`whiten_reward`), clipped
    /// (`reward_clip`), and lowered by `no_eos_penalty` for responses cut off without EOS.
    pub shaped: Vec<f64>,
}

/// Applies the reward rule to each rollout (`safety_prompt[i]`: its category is `safety`;
/// `ended[i]`: its response ends with EOS) and shapes the result as the settings say.
pub fn shape_rewards(
    helpfulness: Option<&ModelScores>,
    safety: Option<&ModelScores>,
    safety_prompt: &[bool],
    ended: &[bool],
    s: &PpoSection,
) -> Rewards {
    let mut sources = Vec::with_capacity(ended.len());
    let mut combined = Vec::with_capacity(ended.len());
    for (i, &is_safety) in safety_prompt.iter().enumerate() {
        // The threshold applies to the safety model's raw output as a probability.
        let (pick, source) = combine_reward(
            helpfulness.map(|m| m.raw[i]),
            safety.map(|m| m.raw[i]),
            is_safety,
            s.safety_threshold,
        );
        let chosen = match source {
            RewardSource::Safety => safety,
            RewardSource::Helpfulness => helpfulness,
        };
        sources.push(source);
        combined.push(chosen.map_or(pick, |m| m.rewarded[i]));
    }
    let mut shaped = combined.clone();
    if s.whiten_reward && shaped.len() > 1 {
        whiten(&mut shaped);
    }
    for (value, &ended) in shaped.iter_mut().zip(ended) {
        if let Some(clip) = s.reward_clip {
            *value = value.clamp(-clip, clip);
        }
        if !ended {
            *value -= s.no_eos_penalty;
        }
    }
    Rewards {
        combined,
        sources,
        shaped,
    }
}

/// What PPO fits at each response token, and the batch statistics it reports.
#[derive(Debug, Clone)]
pub struct Advantages {
    /// Whitened over all response tokens of the batch.
    pub advantages: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
    /// Mean KL to the reference per sequence.
    pub kl_mean: f64,
    pub explained_variance: f64,
}

/// Per-token rewards (the shaped sequence reward at the last token, `-β` times the KL to the
/// reference at every token), GAE with the value model's estimates, and whitened advantages.
pub fn advantages(
    shaped: &[f64],
    old_logp: &[Vec<f64>],
    ref_logp: &[Vec<f64>],
    old_values: &[Vec<f64>],
    beta: f64,
    gamma: f64,
    lam: f64,
) -> Advantages {
    let kl_tokens: Vec<Vec<f64>> = old_logp
        .iter()
        .zip(ref_logp)
        .map(|(a, b)| token_kl(a, b))
        .collect();
    let kl_per_sequence: Vec<f64> = kl_tokens.iter().map(|k| k.iter().sum()).collect();
    let (kl_mean, _) = mean_std(&kl_per_sequence);
    let mut advantages = Vec::with_capacity(shaped.len());
    let mut returns = Vec::with_capacity(shaped.len());
    for (i, &reward) in shaped.iter().enumerate() {
        let rewards = token_rewards(reward, &kl_tokens[i], beta);
        let (a, r) = gae(&rewards, &old_values[i], gamma, lam);
        advantages.push(a);
        returns.push(r);
    }
    let mut flat: Vec<f64> = advantages.iter().flatten().copied().collect();
    whiten(&mut flat);
    let mut at = 0;
    for a in advantages.iter_mut() {
        let n = a.len();
        a.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    let all_values: Vec<f64> = old_values.iter().flatten().copied().collect();
    let all_returns: Vec<f64> = returns.iter().flatten().copied().collect();
    Advantages {
        explained_variance: explained_variance(&all_values, &all_returns),
        advantages,
        returns,
        kl_mean,
    }
}

/// GRPO's advantages: each reward's distance from the mean of its group (`group` consecutive
/// rollouts answer the same prompt) in units of the group's sample standard deviation (Bessel's
/// correction, as `torch.std`), `(r - mean) / (std + 1e-4)`. A group of equal rewards gets 0.
pub fn grpo_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            let std = var.sqrt();
            g.iter().map(move |r| (r - mean) / (std + 1e-4))
        })
        .collect()
}

/// RLOO's advantages: each reward minus the mean of the other rewards of its group.
pub fn rloo_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let (n, sum) = (g.len() as f64, g.iter().sum::<f64>());
            g.iter().map(move |r| {
                if n > 1.0 {
                    r - (sum - r) / (n - 1.0)
                } else {
                    0.0
                }
            })
        })
        .collect()
}

/// The advantages of the critic-free estimators (`baseline`: [`grpo_advantages`] or
/// [`rloo_advantages`]): one value per answer from its sequence reward
/// (the shaped reward, less `β · KL` summed over the answer when `beta_in_reward > 0`),
/// relative to the other answers of its group, given to every token of the answer. No returns
/// (there is no value model to fit) and no explained variance.
pub fn critic_free_advantages(
    baseline: fn(&[f64], usize) -> Vec<f64>,
    shaped: &[f64],
    old_logp: &[Vec<f64>],
    ref_logp: &[Vec<f64>],
    beta_in_reward: f64,
    group: usize,
) -> Advantages {
    let kl_per_sequence: Vec<f64> = old_logp
        .iter()
        .zip(ref_logp)
        .map(|(a, b)| token_kl(a, b).iter().sum())
        .collect();
    let rewards: Vec<f64> = shaped
        .iter()
        .zip(&kl_per_sequence)
        .map(|(r, kl)| r - beta_in_reward * kl)
        .collect();
    let per_sequence = baseline(&rewards, group);
    let advantages = per_sequence
        .iter()
        .zip(old_logp)
        .map(|(&a, tokens)| vec![a; tokens.len()])
        .collect();
    Advantages {
        advantages,
        returns: old_logp.iter().map(|t| vec![0.0; t.len()]).collect(),
        kl_mean: mean_std(&kl_per_sequence).0,
        explained_variance: 0.0,
    }
}

/// GRPO's per-token KL estimate (Schulman's k3, unbiased and never negative):
/// `exp(ρ - π) - (ρ - π) - 1` with `π`, `ρ` the policy's and the reference's log-probabilities.
pub fn kl_k3(logp: Tensor<2>, ref_logp: Tensor<2>) -> Tensor<2> {
    let diff = ref_logp - logp;
    diff.clone().exp() - diff - 1.0
}

/// Mean and (population) standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let stats = reward::RewardStats::of(values);
    (stats.mean, stats.std)
}

/// The KL penalty's per-token estimate, `log π(t) - log π_ref(t)` for each sampled token.
pub fn token_kl(logp: &[f64], ref_logp: &[f64]) -> Vec<f64> {
    logp.iter().zip(ref_logp).map(|(a, b)| a - b).collect()
}

/// Shifts and scales to mean 0 and standard deviation 1 (unchanged spread when constant).
pub fn whiten(values: &mut [f64]) {
    let (mean, std) = mean_std(values);
    for v in values.iter_mut() {
        *v = (*v - mean) / (std + 1e-8);
    }
}

/// Per-token rewards of one response: `-β * kl[t]` at every token, plus the sequence reward at
/// the last token (the EOS when the response has one).
pub fn token_rewards(score: f64, kl: &[f64], beta: f64) -> Vec<f64> {
    let mut rewards: Vec<f64> = kl.iter().map(|k| -beta * k).collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    rewards
}

/// Generalised advantage estimation over one response: `values[t]` is the value of the state
/// before token `t`; the state after the last token is terminal (value 0). Returns the
/// advantages and the returns (advantage + value).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut advantages = vec![0.0; n];
    let mut next_advantage = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_advantage = delta + gamma * lam * next_advantage;
        advantages[t] = next_advantage;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// 1 - Var(returns - values) / Var(returns): how much of the returns the value model explains.
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let (_, std_r) = mean_std(returns);
    let residual: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let (_, std_e) = mean_std(&residual);
    if std_r == 0.0 {
        return 0.0;
    }
    1.0 - (std_e * std_e) / (std_r * std_r)
}

/// The clipped PPO policy loss, `mean over masked tokens of max(-A r, -A clip(r, 1-ε, 1+ε))`
/// with `r = exp(logp - old_logp)`. `mask` is 1 on response tokens; `count` their number.
pub fn policy_loss(
    logp: Tensor<2>,
    old_logp: Tensor<2>,
    advantages: Tensor<2>,
    mask: Tensor<2>,
    clip: f64,
    count: usize,
) -> Tensor<1> {
    let ratio = (logp - old_logp).exp();
    let unclipped = advantages.clone().neg() * ratio.clone();
    let clipped = advantages.neg() * ratio.clamp(1.0 - clip, 1.0 + clip);
    (unclipped.max_pair(clipped) * mask).sum() / (count.max(1) as f64)
}

/// The clipped value loss, `mean over masked tokens of 0.5 * max((V - R)^2, (V_clip - R)^2)`
/// with `V_clip = V_old + clip(V - V_old, -ε, ε)`.
pub fn value_loss(
    values: Tensor<2>,
    old_values: Tensor<2>,
    returns: Tensor<2>,
    mask: Tensor<2>,
    clip: f64,
    count: usize,
) -> Tensor<1> {
    let clipped = old_values.clone() + (values.clone() - old_values).clamp(-clip, clip);
    let a = (values - returns.clone()).square();
    let b = (clipped - returns).square();
    (a.max_pair(b) * mask).sum() * 0.5 / (count.max(1) as f64)
}

/// The adaptive KL controller of Ziegler et al. (2019): β moves toward the value that keeps
/// the KL per sequence at `target`, by at most 20% of the error per `horizon` samples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub target: Option<f64>,
    pub horizon: usize,
}

impl KlController {
    pub fn update(&mut self, kl: f64, samples: usize) {
        if let Some(target) = self.target {
            let error = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * samples as f64 / self.horizon.max(1) as f64;
        }
    }
}
