//! One PPO iteration: rollout → score → advantages → update → report. Sampling is KV-cached
//! and without autodiff; scoring takes the old and reference log-probabilities, the value
//! model's estimates and the reward models' scores; the update (`update.rs`) runs clipped PPO
//! over `ppo_epochs` passes in mini-batches.

use std::time::Instant;
use trainer::chunked::GradPlan;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use data::Tokenizer;
use llama::{Llama, LlamaConfig, SamplingParams};
use reward::RewardModel;
use trainer::optim::adamw;
use trainer::recipe::TrainSection;
use trainer::{Result, TrainError};

use crate::algo::{
    advantages, critic_free_advantages, grpo_advantages, mean_std, rloo_advantages, shape_rewards,
    Advantages, KlController, ModelScores, RewardSource, Rewards,
};
use crate::rollout::{gather_rows, pad_rollouts, token_logprobs, token_values, Rollout};
use crate::section::{Estimator, KlPenalty, PpoSection};
use crate::update::Targets;

/// Everything one iteration reports.
#[derive(Debug, Clone, Default)]
pub struct IterationReport {
    pub values: Vec<(&'static str, f64)>,
    pub reward_mean: f64,
    pub kl: f64,
    pub samples: Vec<serde_json::Value>,
    pub generation_s: f64,
    pub scoring_s: f64,
    pub update_s: f64,
    /// CPU seconds of each phase, all threads (cores busy = CPU / wall seconds).
    pub generation_cpu_s: f64,
    pub scoring_cpu_s: f64,
    pub update_cpu_s: f64,
}

impl IterationReport {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// The models and optimizer state of a PPO run.
pub struct Ppo {
    pub policy: Llama,
    /// The value model of GAE (none for the critic-free estimators).
    pub value: Option<Llama>,
    /// The frozen initial policy.
    pub reference: Llama,
    pub helpfulness: Option<RewardModel>,
    pub safety: Option<RewardModel>,
    pub policy_optimizer: ModuleOptimizer,
    pub value_optimizer: ModuleOptimizer,
    pub kl: KlController,
    pub settings: PpoSection,
    pub lr: f64,
    pub value_lr: f64,
    pub grad_clip: Option<f64>,
    /// Rollouts per gradient step (`ppo.mini_batch_size`).
    pub mini_batch: usize,
    /// Rollouts per pass through a model (`train.micro_batch_size`): the update's gradient
    /// accumulation, scoring and reward scoring go this many at a time.
    pub micro_batch: usize,
    pub seed: u64,
    pub eos: u32,
    pub pad: u32,
    pub max_positions: usize,
    /// Ids the policy may generate: those its tokenizer can decode (the vocabulary unless the
    /// embedding is padded past the tokenizer). Sampling and log-probs both use only these.
    pub vocab_limit: usize,
    /// Positions per chunk of the policy's language-model head (`train.loss_chunk`; 0: all).
    pub loss_chunk: usize,
    /// How the update takes gradients: the head in chunks, layers recomputed
    /// (`train.activation_checkpointing`).
    pub grad_plan: GradPlan,
}

/// The models of a PPO run.
pub struct Models {
    pub policy: Llama,
    pub value: Option<Llama>,
    pub reference: Llama,
    pub helpfulness: Option<RewardModel>,
    pub safety: Option<RewardModel>,
}

/// A prompt to roll out.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub category: Option<String>,
}

/// Old (from generation) and reference log-probabilities and old values at every response
/// token, and the entropy of the sampling policy summed over them.
struct Scored {
    old_logp: Vec<Vec<f64>>,
    ref_logp: Vec<Vec<f64>>,
    old_values: Vec<Vec<f64>>,
    entropy_sum: f64,
}

impl Ppo {
    /// A run's state from its models: `policy` and `value` on an autodiff device, `reference`
    /// and the reward models without autodiff. Fresh optimizers; β from the settings.
    pub fn new(
        models: Models,
        config: &LlamaConfig,
        train: &TrainSection,
        micro_batch: usize,
        settings: PpoSection,
    ) -> Self {
        let mini_batch = settings.mini_batch_size.unwrap_or(micro_batch);
        Self {
            policy: models.policy,
            value: models.value,
            reference: models.reference,
            helpfulness: models.helpfulness,
            safety: models.safety,
            policy_optimizer: adamw(train),
            value_optimizer: adamw(train),
            kl: KlController {
                beta: settings.kl_coef,
                target: settings.target_kl,
                horizon: settings.kl_horizon,
            },
            lr: train.lr,
            value_lr: settings.value_lr.unwrap_or(train.lr),
            settings,
            grad_clip: train.grad_clip,
            mini_batch,
            micro_batch,
            seed: train.seed,
            eos: config.eos_token_id,
            pad: config.pad_token_id.unwrap_or(0),
            max_positions: config.context_length(),
            vocab_limit: config.vocab_size,
            loss_chunk: train.loss_chunk,
            grad_plan: GradPlan::new(train),
        }
    }

    /// One PPO iteration on `prompts`, each answered `group_size` times.
    pub fn iteration(
        &mut self,
        prompts: &[Prompt],
        iteration: usize,
        tokenizer: &Tokenizer,
    ) -> Result<IterationReport> {
        let s = self.settings.clone();
        let group = s.group_size.max(1);
        // A prompt's answers are consecutive rollouts: the groups the estimators compare.
        let asked: Vec<Prompt> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), group))
            .collect();

        let cpu = trainer::metrics::cpu_seconds;
        let (started, cpu_started) = (Instant::now(), cpu());
        let sampler = self.policy.valid();
        let rollouts = self.rollout(&sampler, &asked, iteration)?;
        let generation_s = started.elapsed().as_secs_f64();
        let generation_cpu_s = cpu() - cpu_started;

        let (started, cpu_started) = (Instant::now(), cpu());
        let scored = self.score(&rollouts);
        let helpful = self.reward_scores(self.helpfulness.as_ref(), &rollouts, tokenizer)?;
        let safety = self.reward_scores(self.safety.as_ref(), &rollouts, tokenizer)?;
        let safety_prompt: Vec<bool> = rollouts
            .iter()
            .map(|r| r.category.as_deref() == Some("safety"))
            .collect();
        let ended: Vec<bool> = rollouts.iter().map(|r| r.ended).collect();
        let rewards = shape_rewards(
            helpful.as_ref(),
            safety.as_ref(),
            &safety_prompt,
            &ended,
            &s,
        );
        let beta_in_reward = match s.kl_penalty() {
            KlPenalty::Reward => self.kl.beta,
            KlPenalty::Loss => 0.0,
        };
        let fit = match s.estimator {
            Estimator::Gae => advantages(
                &rewards.shaped,
                &scored.old_logp,
                &scored.ref_logp,
                &scored.old_values,
                beta_in_reward,
                s.gamma,
                s.lam,
            ),
            Estimator::Grpo => critic_free_advantages(
                grpo_advantages,
                &rewards.shaped,
                &scored.old_logp,
                &scored.ref_logp,
                beta_in_reward,
                group,
            ),
            Estimator::Rloo => critic_free_advantages(
                rloo_advantages,
                &rewards.shaped,
                &scored.old_logp,
                &scored.ref_logp,
                beta_in_reward,
                group,
            ),
        };
        let scoring_s = started.elapsed().as_secs_f64();
        let scoring_cpu_s = cpu() - cpu_started;

        let (started, cpu_started) = (Instant::now(), cpu());
        let targets = Targets {
            old_logp: &scored.old_logp,
            ref_logp: &scored.ref_logp,
            old_values: &scored.old_values,
            advantages: &fit.advantages,
            returns: &fit.returns,
        };
        let update = self.update(&rollouts, &targets, iteration);
        let update_s = started.elapsed().as_secs_f64();
        let update_cpu_s = cpu() - cpu_started;
        let update_tokens = update.sequence_tokens;
        let beta = self.kl.beta;
        self.kl.update(fit.kl_mean, rollouts.len());

        let (reward_mean, reward_std) = mean_std(&rewards.combined);
        let generated_tokens: usize = rollouts.iter().map(|r| r.response.len()).sum();
        let count = |f: &dyn Fn(usize) -> bool| {
            (0..rollouts.len()).filter(|&i| f(i)).count() as f64 / rollouts.len() as f64
        };
        let lengths: Vec<f64> = rollouts.iter().map(|r| r.response.len() as f64).collect();
        let mut values = vec![
            ("reward_mean", reward_mean),
            ("reward_std", reward_std),
            ("kl", fit.kl_mean),
            ("kl_coef", beta),
            (
                "entropy",
                scored.entropy_sum / generated_tokens.max(1) as f64,
            ),
        ];
        values.extend(update.metrics());
        if self.value.is_some() {
            values.push(("explained_variance", fit.explained_variance));
        }
        values.extend([
            ("response_length", mean_std(&lengths).0),
            ("eos_fraction", count(&|i| rollouts[i].ended)),
            (
                "safety_fraction",
                count(&|i| rewards.sources[i] == RewardSource::Safety),
            ),
            (
                "rollout_tokens_per_sec",
                generated_tokens as f64 / generation_s.max(1e-9),
            ),
            (
                "update_tokens_per_sec",
                update_tokens as f64 / update_s.max(1e-9),
            ),
            ("generation_s", generation_s),
            ("scoring_s", scoring_s),
            ("update_s", update_s),
        ]);
        for (scores, mean_key, std_key) in [
            (&helpful, "helpfulness_score_mean", "helpfulness_score_std"),
            (&safety, "safety_score_mean", "safety_score_std"),
        ] {
            if let Some(scores) = scores {
                let (m, sd) = mean_std(&scores.raw);
                values.extend([(mean_key, m), (std_key, sd)]);
            }
        }
        let samples = samples(
            &rollouts, &rewards, &helpful, &safety, &fit, iteration, &s, tokenizer,
        );
        Ok(IterationReport {
            values,
            reward_mean,
            kl: fit.kl_mean,
            samples,
            generation_s,
            scoring_s,
            update_s,
            generation_cpu_s,
            scoring_cpu_s,
            update_cpu_s,
        })
    }

    /// Samples one answer to every prompt from `sampler` (the policy without autodiff).
    fn rollout(
        &self,
        sampler: &Llama,
        prompts: &[Prompt],
        iteration: usize,
    ) -> Result<Vec<Rollout>> {
        let s = &self.settings;
        let params = SamplingParams {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature as f32,
            top_p: s.top_p as f32,
            seed: self
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(iteration as u64),
            eos_token_id: Some(self.eos),
            pad_token_id: self.pad,
            use_cache: true,
            max_positions: self.max_positions,
            vocab_limit: Some(self.vocab_limit),
        };
        let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let mut generated = Vec::with_capacity(prompt_ids.len());
        let at_a_time = s.generation_batch.unwrap_or(prompt_ids.len()).max(1);
        for (part, ids) in prompt_ids.chunks(at_a_time).enumerate() {
            // Each part its own stream; the whole batch at once keeps the iteration's seed.
            let params = SamplingParams {
                seed: params
                    .seed
                    .wrapping_add((part as u64).wrapping_mul(0x2545_f491)),
                ..params.clone()
            };
            generated.extend(llama::generate(sampler, ids, &params)?);
        }
        let rollouts: Vec<Rollout> = prompts
            .iter()
            .zip(generated)
            .map(|(p, g)| Rollout {
                prompt: p.ids.clone(),
                ended: g.stopped_at_eos,
                response: g.tokens,
                category: p.category.clone(),
                entropy: g.entropies.iter().sum(),
                logprobs: g.logprobs,
            })
            .collect();
        if rollouts.iter().any(|r| r.response.is_empty()) {
            return Err(TrainError::Invalid(
                "a prompt left no room for a response within the model's context".into(),
            ));
        }
        Ok(rollouts)
    }

    /// The reference's log-probabilities and the value model's estimates at the response
    /// positions. The old log-probabilities and the entropy come from generation, which drew the
    /// tokens from those very distributions: no policy pass here.
    fn score(&self, rollouts: &[Rollout]) -> Scored {
        let s = &self.settings;
        let mut scored = Scored {
            old_logp: rollouts.iter().map(|r| r.logprobs.clone()).collect(),
            ref_logp: Vec::with_capacity(rollouts.len()),
            old_values: Vec::with_capacity(rollouts.len()),
            entropy_sum: rollouts.iter().map(|r| r.entropy).sum(),
        };
        let frozen_value = self.value.as_ref().map(|v| v.valid());
        let all: Vec<&Rollout> = rollouts.iter().collect();
        for chunk in all.chunks(self.micro_batch.max(1)) {
            let padded = pad_rollouts(chunk, self.pad);
            let rows = |t| gather_rows(chunk, &llama::model::to_host(t), &padded);
            let logp = token_logprobs(
                &self.reference,
                &padded,
                s.temperature,
                self.vocab_limit,
                self.loss_chunk,
            );
            scored.ref_logp.extend(rows(logp));
            match &frozen_value {
                Some(value) => scored.old_values.extend(rows(token_values(value, &padded))),
                None => scored
                    .old_values
                    .extend(chunk.iter().map(|r| vec![0.0; r.response.len()])),
            }
        }
        scored
    }

    /// A reward model's scores of the rollouts, raw and as rewarded.
    fn reward_scores(
        &self,
        rm: Option<&RewardModel>,
        rollouts: &[Rollout],
        tokenizer: &Tokenizer,
    ) -> Result<Option<ModelScores>> {
        let Some(rm) = rm else {
            return Ok(None);
        };
        let sequences: Vec<Vec<u32>> = rollouts.iter().map(Rollout::sequence).collect();
        let raw = rm.score(&sequences, tokenizer, self.micro_batch.max(1))?;
        let rewarded = match rm.stats {
            Some(stats) if self.settings.normalize_reward => raw
                .iter()
                .map(|x| (x - stats.mean) / stats.std.max(1e-8))
                .collect(),
            _ => raw.clone(),
        };
        Ok(Some(ModelScores { raw, rewarded }))
    }
}

/// The first `settings.samples` rollouts as JSON, for `samples.jsonl` and TensorBoard: the
/// text, the token ids, the rewards and (critic-free estimators) the answer's advantage.
#[allow(clippy::too_many_arguments)]
fn samples(
    rollouts: &[Rollout],
    rewards: &Rewards,
    helpful: &Option<ModelScores>,
    safety: &Option<ModelScores>,
    fit: &Advantages,
    iteration: usize,
    s: &PpoSection,
    tokenizer: &Tokenizer,
) -> Vec<serde_json::Value> {
    rollouts
        .iter()
        .enumerate()
        .take(s.samples)
        .map(|(i, r)| {
            serde_json::json!({
                "iteration": iteration + 1,
                "prompt": tokenizer.decode(&r.prompt).unwrap_or_default(),
                "response": tokenizer.decode(&r.response).unwrap_or_default(),
                "category": r.category,
                "reward": rewards.combined[i],
                "source": rewards.sources[i],
                "helpfulness_score": helpful.as_ref().map(|v| v.raw[i]),
                "safety_score": safety.as_ref().map(|v| v.raw[i]),
                "ended_with_eos": r.ended,
                "prompt_ids": r.prompt,
                "response_ids": r.response,
                "advantage": (s.estimator != Estimator::Gae)
                    .then(|| fit.advantages[i].first().copied())
                    .flatten(),
            })
        })
        .collect()
}
