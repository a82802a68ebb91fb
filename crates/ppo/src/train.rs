//! The PPO loop. Each iteration: sample answers for a batch of prompts (KV-cached), score them
//! (log-probabilities under policy and reference, values, reward models), turn scores into
//! per-token rewards and GAE advantages, then update policy and value model with clipped losses
//! over `ppo_epochs` passes in mini-batches.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use data::{Tokenized, Tokenizer};
use llama::{Head, Llama, LlamaConfig, SamplingParams};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use reward::RewardStats;
use trainer::optim::{adamw, clip_grad_norm};
use trainer::recipe::PpoSection;
use trainer::run::{io_err, Result, RunOptions, TrainError, TrainerState};
use trainer::step::{due, DeviceSum};
use trainer::Recipe;

use crate::algo::{
    combine_reward, explained_variance, gae, mean_std, policy_loss, token_kl, token_rewards,
    value_loss, whiten, KlController, RewardSource,
};
use crate::rollout::{
    gather_rows, pad_rollouts, response_mask, scatter, token_logprobs, token_values, Rollout,
};

const VALUE_DIR: &str = "value";

/// A frozen reward model with what it needs to score rollouts.
pub struct RewardModel {
    pub model: Llama,
    pub stats: Option<RewardStats>,
    /// Set when the reward model's tokenizer differs from the policy's (`retokenize`).
    pub tokenizer: Option<Tokenizer>,
    pub pad: u32,
}

impl RewardModel {
    /// Loads a reward model directory on `device` (no autodiff: it never holds gradients) and
    /// checks its tokenizer against the policy's.
    pub fn load(
        dir: &Path,
        device: &Device,
        policy_tokenizer: &Tokenizer,
        retokenize: bool,
        need_stats: bool,
    ) -> Result<Self> {
        let (config, model) = reward::score::load_reward_model(dir, device)?;
        if !retokenize {
            trainer::run::check_vocab(policy_tokenizer, &config, dir)?;
        }
        let stats = RewardStats::load(dir)?;
        if need_stats && stats.is_none() {
            return Err(TrainError::Invalid(format!(
                "{}: no {} to normalise with (ppo.normalize_reward = true)",
                dir.display(),
                reward::eval::STATS_FILE
            )));
        }
        let own = dir.join("tokenizer.json");
        let tokenizer = if own.exists() {
            let theirs = Tokenizer::from_file(&own)?;
            if theirs.same_vocabulary(policy_tokenizer) {
                None
            } else if retokenize {
                Some(theirs)
            } else {
                return Err(TrainError::Invalid(format!(
                    "{}: the reward model's tokenizer differs from the policy's; set \
                     ppo.retokenize = true to score decoded text re-tokenized for it",
                    own.display()
                )));
            }
        } else {
            None
        };
        Ok(Self {
            pad: reward::train::reward_pad_id(&config),
            model,
            stats,
            tokenizer,
        })
    }

    /// Raw scores of every rollout, read at each sequence's last real token.
    pub fn score(
        &self,
        rollouts: &[Rollout],
        policy_tokenizer: &Tokenizer,
        batch: usize,
    ) -> Result<Vec<f64>> {
        let sequences: Vec<Vec<u32>> = match &self.tokenizer {
            None => rollouts.iter().map(Rollout::sequence).collect(),
            Some(theirs) => rollouts
                .iter()
                .map(|r| retokenize(r, policy_tokenizer, theirs))
                .collect::<Result<_>>()?,
        };
        reward::score::score_sequences(&self.model, &sequences, batch, self.pad)
    }
}

/// The rollout's text in another tokenizer: BOS, the decoded prompt and response, and EOS when
/// the response ended with one.
fn retokenize(rollout: &Rollout, ours: &Tokenizer, theirs: &Tokenizer) -> Result<Vec<u32>> {
    let strip = |ids: &[u32]| -> Vec<u32> {
        ids.iter()
            .copied()
            .filter(|&t| t != ours.bos_id && t != ours.eos_id)
            .collect()
    };
    let text = ours.decode(&strip(&rollout.sequence()))?;
    let mut ids = theirs.encode_with_bos(&text)?;
    if rollout.ended {
        ids.push(theirs.eos_id);
    }
    Ok(ids)
}

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
}

impl IterationReport {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// The models and optimizer state of a PPO run.
pub struct Ppo {
    pub policy: Llama,
    pub value: Llama,
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
    pub mini_batch: usize,
    pub seed: u64,
    pub eos: u32,
    pub pad: u32,
    pub max_positions: usize,
    /// Ids the policy may generate: those its tokenizer can decode (the vocabulary unless the
    /// embedding is padded past the tokenizer). Sampling and log-probs both use only these.
    pub vocab_limit: usize,
}

/// The models of a PPO run.
pub struct Models {
    pub policy: Llama,
    pub value: Llama,
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

impl Ppo {
    /// A run's state from its models: `policy` and `value` on an autodiff device, `reference`
    /// and the reward models without autodiff. Fresh optimizers; β from the settings.
    pub fn new(
        models: Models,
        config: &LlamaConfig,
        train: &trainer::recipe::TrainSection,
        mini_batch: usize,
        settings: PpoSection,
    ) -> Self {
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
            seed: train.seed,
            eos: config.eos_token_id,
            pad: config.pad_token_id.unwrap_or(0),
            max_positions: config.max_position_embeddings,
            vocab_limit: config.vocab_size,
        }
    }

    /// One PPO iteration on `prompts`.
    pub fn iteration(
        &mut self,
        prompts: &[Prompt],
        iteration: usize,
        tokenizer: &Tokenizer,
    ) -> Result<IterationReport> {
        let s = self.settings.clone();
        let mini = self.mini_batch.max(1);

        // 1. Rollouts: KV-cached sampling from the current policy, without autodiff.
        let started = Instant::now();
        let sampler = self.policy.valid();
        let rollouts = self.rollout(&sampler, prompts, iteration)?;
        let generation_s = started.elapsed().as_secs_f64();
        let generated_tokens: usize = rollouts.iter().map(|r| r.response.len()).sum();

        // 2. Scoring: old and reference log-probabilities, values, rewards.
        let started = Instant::now();
        let mut old_logp = Vec::with_capacity(rollouts.len());
        let mut ref_logp = Vec::with_capacity(rollouts.len());
        let mut old_values = Vec::with_capacity(rollouts.len());
        // Entropy of the sampling policy, summed over response tokens (a metric only, so it is
        // taken here once, without autodiff, not in every update pass).
        let mut entropy_sum = 0.0;
        let frozen_value = self.value.valid();
        let all: Vec<&Rollout> = rollouts.iter().collect();
        for chunk in all.chunks(mini) {
            let padded = pad_rollouts(chunk, self.pad);
            let (logp, entropy) =
                token_logprobs(&sampler, &padded, s.temperature, self.vocab_limit, true);
            old_logp.extend(gather_rows(
                chunk,
                &llama::model::to_host(logp),
                padded.width,
            ));
            if let Some(entropy) = entropy {
                let rows = gather_rows(chunk, &llama::model::to_host(entropy), padded.width);
                entropy_sum += rows.iter().flatten().sum::<f64>();
            }
            let (logp, _) = token_logprobs(
                &self.reference,
                &padded,
                s.temperature,
                self.vocab_limit,
                false,
            );
            ref_logp.extend(gather_rows(
                chunk,
                &llama::model::to_host(logp),
                padded.width,
            ));
            let values = token_values(&frozen_value, &padded);
            old_values.extend(gather_rows(
                chunk,
                &llama::model::to_host(values),
                padded.width,
            ));
        }
        let score_with = |rm: &Option<RewardModel>| -> Result<Option<Vec<f64>>> {
            rm.as_ref()
                .map(|m| m.score(&rollouts, tokenizer, mini))
                .transpose()
        };
        let helpful = score_with(&self.helpfulness)?;
        let safety = score_with(&self.safety)?;
        let normalise = |scores: &Option<Vec<f64>>, rm: &Option<RewardModel>| {
            scores
                .as_ref()
                .map(|v| match rm.as_ref().and_then(|m| m.stats) {
                    Some(stats) if s.normalize_reward => v
                        .iter()
                        .map(|x| (x - stats.mean) / stats.std.max(1e-8))
                        .collect(),
                    _ => v.clone(),
                })
        };
        let helpful_n = normalise(&helpful, &self.helpfulness);
        let safety_n = normalise(&safety, &self.safety);
        let mut sources = Vec::with_capacity(rollouts.len());
        let mut combined = Vec::with_capacity(rollouts.len());
        for (i, r) in rollouts.iter().enumerate() {
            let is_safety = r.category.as_deref() == Some("safety");
            // The threshold applies to the safety model's raw output as a probability.
            let (pick, source) = combine_reward(
                helpful.as_ref().map(|v| v[i]),
                safety.as_ref().map(|v| v[i]),
                is_safety,
                s.safety_threshold,
            );
            let value = match source {
                RewardSource::Safety => safety_n.as_ref().map_or(pick, |v| v[i]),
                RewardSource::Helpfulness => helpful_n.as_ref().map_or(pick, |v| v[i]),
            };
            sources.push(source);
            combined.push(value);
        }
        let (reward_mean, reward_std) = mean_std(&combined);
        let mut shaped = combined.clone();
        if s.whiten_reward && shaped.len() > 1 {
            whiten(&mut shaped);
        }
        for (value, r) in shaped.iter_mut().zip(&rollouts) {
            if let Some(clip) = s.reward_clip {
                *value = value.clamp(-clip, clip);
            }
            if !r.ended {
                *value -= s.no_eos_penalty;
            }
        }
        let kl_tokens: Vec<Vec<f64>> = old_logp
            .iter()
            .zip(&ref_logp)
            .map(|(a, b)| token_kl(a, b))
            .collect();
        let kl_per_sequence: Vec<f64> = kl_tokens.iter().map(|k| k.iter().sum()).collect();
        let (kl_mean, _) = mean_std(&kl_per_sequence);
        let mut advantages = Vec::with_capacity(rollouts.len());
        let mut returns = Vec::with_capacity(rollouts.len());
        for i in 0..rollouts.len() {
            let rewards = token_rewards(shaped[i], &kl_tokens[i], self.kl.beta);
            let (a, r) = gae(&rewards, &old_values[i], s.gamma, s.lam);
            advantages.push(a);
            returns.push(r);
        }
        // Whiten advantages over all response tokens of the batch.
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
        let explained = explained_variance(&all_values, &all_returns);
        let scoring_s = started.elapsed().as_secs_f64();

        // 3. Update: `ppo_epochs` passes, one gradient step per mini-batch for each model.
        let started = Instant::now();
        let targets = Targets {
            old_logp: &old_logp,
            old_values: &old_values,
            advantages: &advantages,
            returns: &returns,
        };
        let u = self.update(&rollouts, &targets, iteration);
        let update_s = started.elapsed().as_secs_f64();
        let beta = self.kl.beta;
        self.kl.update(kl_mean, rollouts.len());

        let lengths: Vec<f64> = rollouts.iter().map(|r| r.response.len() as f64).collect();
        let seen = u.tokens.max(1) as f64;
        let steps = u.steps.max(1) as f64;
        let mut values = vec![
            ("reward_mean", reward_mean),
            ("reward_std", reward_std),
            ("kl", kl_mean),
            ("kl_coef", beta),
            ("entropy", entropy_sum / generated_tokens.max(1) as f64),
            ("clip_fraction", u.clipped.read() / seen),
            ("approx_kl", u.approx_kl.read() / seen),
            ("policy_loss", u.policy_loss.read() / steps),
            ("value_loss", u.value_loss.read() / steps),
            ("explained_variance", explained),
            ("grad_norm", u.grad_norm),
            ("value_grad_norm", u.value_grad_norm),
            ("response_length", mean_std(&lengths).0),
            (
                "eos_fraction",
                rollouts.iter().filter(|r| r.ended).count() as f64 / rollouts.len() as f64,
            ),
            (
                "safety_fraction",
                sources
                    .iter()
                    .filter(|&&x| x == RewardSource::Safety)
                    .count() as f64
                    / rollouts.len() as f64,
            ),
            (
                "rollout_tokens_per_sec",
                generated_tokens as f64 / generation_s.max(1e-9),
            ),
            (
                "update_tokens_per_sec",
                u.sequence_tokens as f64 / update_s.max(1e-9),
            ),
            ("generation_s", generation_s),
            ("scoring_s", scoring_s),
            ("update_s", update_s),
        ];
        if let Some(h) = &helpful {
            let (m, sd) = mean_std(h);
            values.push(("helpfulness_score_mean", m));
            values.push(("helpfulness_score_std", sd));
        }
        if let Some(v) = &safety {
            let (m, sd) = mean_std(v);
            values.push(("safety_score_mean", m));
            values.push(("safety_score_std", sd));
        }
        let samples = rollouts
            .iter()
            .enumerate()
            .take(s.samples)
            .map(|(i, r)| {
                serde_json::json!({
                    "iteration": iteration + 1,
                    "prompt": tokenizer.decode(&r.prompt).unwrap_or_default(),
                    "response": tokenizer.decode(&r.response).unwrap_or_default(),
                    "category": r.category,
                    "reward": combined[i],
                    "source": sources[i],
                    "helpfulness_score": helpful.as_ref().map(|v| v[i]),
                    "safety_score": safety.as_ref().map(|v| v[i]),
                    "ended_with_eos": r.ended,
                })
            })
            .collect();
        Ok(IterationReport {
            values,
            reward_mean,
            kl: kl_mean,
            samples,
            generation_s,
            scoring_s,
            update_s,
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
        let generated = llama::generate(sampler, &prompt_ids, &params)?;
        let rollouts: Vec<Rollout> = prompts
            .iter()
            .zip(generated)
            .map(|(p, g)| Rollout {
                prompt: p.ids.clone(),
                ended: g.stopped_at_eos,
                response: g.tokens,
                category: p.category.clone(),
            })
            .collect();
        if rollouts.iter().any(|r| r.response.is_empty()) {
            return Err(TrainError::Invalid(
                "a prompt left no room for a response within the model's context".into(),
            ));
        }
        Ok(rollouts)
    }

    /// `ppo_epochs` passes over the rollouts in shuffled mini-batches: one clipped policy step
    /// and one clipped value step per mini-batch.
    fn update(&mut self, rollouts: &[Rollout], t: &Targets<'_>, iteration: usize) -> UpdateStats {
        let s = &self.settings;
        let mini = self.mini_batch.max(1);
        let device = self.policy.device();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (iteration as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
        );
        let mut u = UpdateStats::default();
        for _epoch in 0..s.ppo_epochs {
            let mut order: Vec<usize> = (0..rollouts.len()).collect();
            order.shuffle(&mut rng);
            for chunk in order.chunks(mini) {
                let batch: Vec<&Rollout> = chunk.iter().map(|&i| &rollouts[i]).collect();
                let padded = pad_rollouts(&batch, self.pad);
                let width = padded.width;
                let tensor = |field: &[Vec<f64>]| {
                    let rows: Vec<&[f64]> = chunk.iter().map(|&i| field[i].as_slice()).collect();
                    scatter(&batch, &rows, width, &device)
                };
                let mask = response_mask(&batch, width, &device);
                let count: usize = batch.iter().map(|r| r.response.len()).sum();
                u.sequence_tokens += batch
                    .iter()
                    .map(|r| r.prompt.len() + r.response.len())
                    .sum::<usize>();

                let (logp, _) = token_logprobs(
                    &self.policy,
                    &padded,
                    s.temperature,
                    self.vocab_limit,
                    false,
                );
                let old_t = tensor(t.old_logp);
                // Losses and clip statistics are summed on the device; the gradient norms are the only
                // host reads of a mini-batch.
                let log_ratio = logp.clone().detach() - old_t.clone();
                u.approx_kl
                    .add((log_ratio.clone().square() * mask.clone()).sum() * 0.5);
                let outside = (log_ratio.exp() - 1.0).abs().greater_elem(s.clip_range);
                u.clipped.add((outside.float() * mask.clone()).sum());
                u.tokens += count;
                u.steps += 1;
                let advantages = tensor(t.advantages);
                let loss = policy_loss(logp, old_t, advantages, mask.clone(), s.clip_range, count);
                u.policy_loss.add(loss.clone());
                let (policy, grad_norm) = clipped_step(
                    &mut self.policy_optimizer,
                    self.policy.clone(),
                    loss,
                    self.lr,
                    self.grad_clip,
                );
                self.policy = policy;
                u.grad_norm = grad_norm;

                let values = token_values(&self.value, &padded);
                let vloss = value_loss(
                    values,
                    tensor(t.old_values),
                    tensor(t.returns),
                    mask,
                    s.value_clip_range,
                    count,
                ) * s.value_coef;
                u.value_loss.add(vloss.clone());
                let (value, grad_norm) = clipped_step(
                    &mut self.value_optimizer,
                    self.value.clone(),
                    vloss,
                    self.value_lr,
                    self.grad_clip,
                );
                self.value = value;
                u.value_grad_norm = grad_norm;
            }
        }
        u
    }
}

/// One AdamW step of `model` on `loss`, its gradients clipped by their global norm (returned,
/// before clipping).
fn clipped_step(
    optimizer: &mut ModuleOptimizer,
    model: Llama,
    loss: Tensor<1>,
    lr: f64,
    grad_clip: Option<f64>,
) -> (Llama, f64) {
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    let grad_norm = clip_grad_norm(&model, &mut grads, grad_clip);
    (optimizer.step(lr, model, grads), grad_norm)
}

/// Per-token quantities of each rollout (at its response positions) that the update fits.
struct Targets<'a> {
    old_logp: &'a [Vec<f64>],
    old_values: &'a [Vec<f64>],
    advantages: &'a [Vec<f64>],
    returns: &'a [Vec<f64>],
}

/// What the update measured.
#[derive(Default)]
struct UpdateStats {
    /// Sums over mini-batches; divided by `steps` for the metrics.
    policy_loss: DeviceSum,
    value_loss: DeviceSum,
    steps: usize,
    /// Sums over response tokens; divided by `tokens` for the metrics.
    clipped: DeviceSum,
    approx_kl: DeviceSum,
    tokens: usize,
    /// Prompt and response tokens through the models (for update tokens/s).
    sequence_tokens: usize,
    grad_norm: f64,
    value_grad_norm: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub iterations: usize,
    pub first_reward_mean: Option<f64>,
    pub final_reward_mean: f64,
    pub final_kl: f64,
    pub checkpoint: PathBuf,
}

fn section(recipe: &Recipe) -> Result<PpoSection> {
    recipe
        .ppo
        .clone()
        .ok_or_else(|| TrainError::Invalid("the recipe has no [ppo] section".into()))
}

/// The prompts of the recipe's data, with their categories.
fn load_prompts(recipe: &Recipe, tokenizer: &Tokenizer) -> Result<(Vec<Prompt>, usize)> {
    let data = trainer::run::load_recipe_data(recipe, tokenizer)?;
    let dropped: usize = data.sources.iter().map(|s| s.dropped).sum();
    let prompts: Vec<Prompt> = data
        .train
        .into_iter()
        .filter_map(|item| match item.tokens {
            Tokenized::Prompt { ids, category } => Some(Prompt { ids, category }),
            _ => None,
        })
        .collect();
    if prompts.is_empty() {
        return Err(TrainError::Invalid(
            "the data holds no prompts (PPO samples from `prompts` records: {\"prompt\"} or \
             {\"messages\"} ending with a user turn)"
                .into(),
        ));
    }
    if dropped > 0 {
        eprintln!(
            "skipped {dropped} prompts longer than data.max_seq_len = {}",
            recipe.data.max_seq_len
        );
    }
    Ok((prompts, dropped))
}

/// Runs PPO as the recipe says.
pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<Summary> {
    let settings = section(recipe)?;
    let train = &recipe.train;
    let inner = llama::parse_device(&recipe.runtime.device)?;
    let device = inner.clone().autodiff();
    let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
    let out = &recipe.output.dir;
    let (lock, resume) = trainer::run::check_output(recipe, options)?;
    let (prompts, _) = load_prompts(recipe, &tokenizer)?;
    trainer::run::check_one_batch(prompts.len(), recipe, "prompts")?;

    let load_rm = |path: &Option<PathBuf>| -> Result<Option<RewardModel>> {
        path.as_ref()
            .map(|p| {
                RewardModel::load(
                    p,
                    &inner,
                    &tokenizer,
                    settings.retokenize,
                    settings.normalize_reward,
                )
            })
            .transpose()
    };
    let helpfulness = load_rm(&settings.reward_model)?;
    let safety = load_rm(&settings.safety_reward_model)?;

    let (config, policy, state) =
        trainer::run::load_or_resume(recipe, &device, Head::Lm, resume.as_deref(), &tokenizer)?;
    trainer::run::check_generation_vocab(&tokenizer, &config, &recipe.model.tokenizer)?;
    if recipe.data.max_seq_len + settings.max_new_tokens > config.max_position_embeddings {
        return Err(TrainError::Invalid(format!(
            "data.max_seq_len {} + ppo.max_new_tokens {} exceeds the model's context of {}",
            recipe.data.max_seq_len, settings.max_new_tokens, config.max_position_embeddings
        )));
    }
    // The reference is the initial policy, loaded again the same way (on resume too).
    let (_, reference) = trainer::run::load_model(recipe, &inner, Head::Lm)?;
    let value_source = settings
        .value_model
        .clone()
        .or_else(|| settings.reward_model.clone())
        .or_else(|| settings.safety_reward_model.clone())
        .expect("the recipe check requires a reward model");
    let (mut value_config, value) = match (&resume, &state) {
        (Some(dir), Some(state)) => {
            let ids: std::collections::HashMap<String, u64> =
                serde_json::from_value(state.extra["value_param_ids"].clone()).map_err(|e| {
                    TrainError::Invalid(format!(
                        "{}: value model parameter ids: {e}",
                        dir.join(trainer::run::STATE_FILE).display()
                    ))
                })?;
            llama::load_pretrained_with_ids(&dir.join(VALUE_DIR), &device, Some(&ids))?
        }
        _ => llama::load_pretrained_as(&value_source, &device, Head::Score, train.seed)?,
    };
    if value.head() != Head::Score {
        return Err(TrainError::Invalid(format!(
            "{}: the value model needs a scalar head",
            value_source.display()
        )));
    }
    trainer::run::check_vocab(&tokenizer, &value_config, &value_source)?;
    let value_tokenizer = value_source.join("tokenizer.json");
    if value_tokenizer.exists()
        && !Tokenizer::from_file(&value_tokenizer)?.same_vocabulary(&tokenizer)
    {
        return Err(TrainError::Invalid(format!(
            "{}: the value model's tokenizer differs from the policy's; give ppo.value_model \
             with the policy's tokenizer",
            value_tokenizer.display()
        )));
    }
    value_config.pad_token_id = Some(value_config.pad_token_id.unwrap_or(0));

    let total = trainer::run::total_steps(recipe, prompts.len());
    let Some(start) = trainer::run::start_step(state.as_ref(), total, resume.as_deref()) else {
        return Ok(Summary {
            iterations: total,
            first_reward_mean: None,
            final_reward_mean: f64::NAN,
            final_kl: f64::NAN,
            checkpoint: resume.unwrap_or_default(),
        });
    };
    let models = Models {
        policy,
        value,
        reference,
        helpfulness,
        safety,
    };
    let mut ppo = Ppo::new(
        models,
        &config,
        train,
        recipe.micro_batch_size(),
        settings.clone(),
    );
    ppo.vocab_limit = tokenizer.vocab_size().min(config.vocab_size);
    if let (Some(dir), Some(state)) = (&resume, &state) {
        ppo.policy_optimizer = trainer::run::optimizer(recipe, Some(dir))?;
        ppo.value_optimizer = trainer::run::optimizer(recipe, Some(&dir.join(VALUE_DIR)))?;
        ppo.kl = serde_json::from_value(state.extra["kl"].clone()).map_err(|e| {
            TrainError::Invalid(format!("{}: KL controller state: {e}", dir.display()))
        })?;
        eprintln!("resuming from {} at iteration {start}", dir.display());
    }
    trainer::run::start_output(recipe, &lock, resume.is_some())?;

    let metrics_path = out.join("metrics.jsonl");
    let mut metrics =
        trainer::metrics::MetricsLogger::open(out, start, total).map_err(io_err(out))?;
    let samples_path = out.join("samples.jsonl");
    let mut samples_file = open_samples(&samples_path, start)?;
    let lengths: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    let mut batches = trainer::step::EpochBatches::new(lengths, recipe);
    let mut first_reward = None;
    let started = Instant::now();
    for iteration in start..total {
        let (_, indices) = batches.batch(iteration);
        let batch: Vec<Prompt> = indices.iter().map(|&i| prompts[i].clone()).collect();
        let report = ppo.iteration(&batch, iteration, &tokenizer)?;
        let done = iteration + 1;
        let bad = report.values.iter().find(|(_, v)| !v.is_finite());
        if let Some((key, value)) = bad {
            return Err(TrainError::Invalid(format!(
                "iteration {done}: {key} is {value}: training diverged; the last checkpoint in \
                 {} is kept",
                out.display()
            )));
        }
        if report.kl > settings.max_kl {
            return Err(TrainError::Invalid(format!(
                "iteration {done}: KL to the reference is {:.3} per sequence, above \
                 ppo.max_kl = {}: the policy ran away; the last checkpoint in {} is kept",
                report.kl,
                settings.max_kl,
                out.display()
            )));
        }
        first_reward.get_or_insert(report.reward_mean);
        metrics.progress(done);
        if due(done, train.log_every.max(1), total) {
            let mut values = report.values.clone();
            values.push(("lr", train.lr));
            metrics
                .log("train", done, &values)
                .map_err(io_err(&metrics_path))?;
        }
        if settings.sample_every > 0 && done % settings.sample_every == 0 {
            let mut markdown = String::new();
            for sample in &report.samples {
                writeln!(samples_file, "{sample}").map_err(io_err(&samples_path))?;
                markdown.push_str(&format!(
                    "**prompt** {}\n\n**response** {}\n\n**reward** {:.4}\n\n---\n\n",
                    sample["prompt"].as_str().unwrap_or(""),
                    sample["response"].as_str().unwrap_or(""),
                    sample["reward"].as_f64().unwrap_or(f64::NAN)
                ));
            }
            samples_file.flush().map_err(io_err(&samples_path))?;
            metrics.text("samples", done, &markdown);
        }
        if due(done, train.save_every, total) {
            let checkpoint = save(&ppo, &config, &value_config, recipe, done, total)?;
            if done == total {
                metrics.finish();
                eprintln!(
                    "finished {total} iterations in {:.1} s; checkpoint {}",
                    started.elapsed().as_secs_f64(),
                    checkpoint.display()
                );
                return Ok(Summary {
                    iterations: total,
                    first_reward_mean: first_reward,
                    final_reward_mean: report.reward_mean,
                    final_kl: report.kl,
                    checkpoint,
                });
            }
        }
    }
    unreachable!("the loop returns at its last iteration")
}

/// `samples.jsonl`, keeping the lines of iterations up to `start` when resuming.
fn open_samples(path: &Path, start: usize) -> Result<std::fs::File> {
    let kept: String = if start > 0 {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["iteration"].as_u64())
                    .is_some_and(|i| (i as usize) <= start)
            })
            .map(|line| format!("{line}\n"))
            .collect()
    } else {
        String::new()
    };
    std::fs::write(path, kept).map_err(io_err(path))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

/// `checkpoint-<iteration>/`: the policy (a Hugging Face directory with its optimizer and the
/// trainer state, which holds the KL controller), and `value/`, the value model with its
/// optimizer.
fn save(
    ppo: &Ppo,
    config: &LlamaConfig,
    value_config: &LlamaConfig,
    recipe: &Recipe,
    step: usize,
    total: usize,
) -> Result<PathBuf> {
    trainer::run::save_checkpoint(recipe, step, |dir| {
        trainer::run::write_model(&ppo.policy, config, recipe, dir)?;
        let value_dir = dir.join(VALUE_DIR);
        trainer::run::write_model(&ppo.value, value_config, recipe, &value_dir)?;
        let path = value_dir.join(trainer::run::OPTIMIZER_FILE);
        ppo.value_optimizer
            .save(&path)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
        let state = TrainerState {
            step,
            total_steps: total,
            seed: recipe.train.seed,
            param_ids: llama::model::param_ids(&ppo.policy),
            extra: serde_json::json!({
                "kl": ppo.kl,
                "value_param_ids": llama::model::param_ids(&ppo.value),
            }),
        };
        trainer::run::write_training_state(dir, &ppo.policy_optimizer, &state)
    })
}

/// Times PPO iterations on the recipe's shapes with random models: a policy from `[model]`,
/// and a reward model and value model of the same architecture with fresh scalar heads;
/// `train.batch_size` random prompts of `data.max_seq_len` tokens. Returns one report per
/// timed iteration (after one warm-up iteration). A benchmark, not a test.
pub fn bench(recipe: &Recipe, iterations: usize) -> Result<Vec<IterationReport>> {
    use rand::Rng;
    let mut settings = section(recipe)?;
    settings.samples = 0;
    let train = &recipe.train;
    let inner = llama::parse_device(&recipe.runtime.device)?;
    let device = inner.clone().autodiff();
    let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
    let (config, policy) = trainer::run::load_model(recipe, &device, Head::Lm)?;
    let (_, reference) = trainer::run::load_model(recipe, &inner, Head::Lm)?;
    let rm = llama::init_random_with_head(&config, &inner, Head::Score, train.seed + 1)?;
    let value = llama::init_random_with_head(&config, &device, Head::Score, train.seed + 2)?;
    let models = Models {
        policy,
        value,
        reference,
        helpfulness: Some(RewardModel {
            model: rm,
            stats: None,
            tokenizer: None,
            pad: 0,
        }),
        safety: None,
    };
    let mut ppo = Ppo::new(models, &config, train, recipe.micro_batch_size(), settings);
    let mut rng = rand::rngs::StdRng::seed_from_u64(train.seed);
    let prompts: Vec<Prompt> = (0..train.batch_size)
        .map(|_| {
            let mut ids = vec![config.bos_token_id];
            ids.extend(
                (1..recipe.data.max_seq_len).map(|_| rng.random_range(3..config.vocab_size as u32)),
            );
            Prompt {
                ids,
                category: None,
            }
        })
        .collect();
    let mut reports = Vec::new();
    for iteration in 0..=iterations {
        let report = ppo.iteration(&prompts, iteration, &tokenizer)?;
        if iteration > 0 {
            reports.push(report);
        }
    }
    Ok(reports)
}
