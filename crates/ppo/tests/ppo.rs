//! PPO's pieces against hand-computed numbers, and a learning test that can fail: against a
//! reward model trained here to like a set of tokens, PPO must raise the mean reward while the
//! KL to the reference stays bounded.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use data::batch::{PairBatch, PairItem};
use llama::{Head, LlamaConfig};
use ppo::algo::{
    combine_reward, critic_free_advantages, gae, grpo_advantages, kl_k3, policy_loss,
    rloo_advantages, token_kl, token_rewards, value_loss, whiten, KlController, RewardSource,
};
use ppo::rollout::{pad_rollouts, response_mask, scatter, Rollout};
use ppo::{Models, Ppo, PpoSection, Prompt};
use rand::{Rng, SeedableRng};
use reward::RewardModel;
use trainer::recipe::TrainSection;

fn test_device() -> Device {
    let name = test_support::test_device_name();
    llama::parse_device(&name).unwrap_or_else(|e| panic!("LLAMA_TEST_DEVICE: {e}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn group_advantages_of_hand_made_groups() {
    // Two groups of 4: rewards 1, 2, 3, 6 (mean 3, sample std sqrt(14/3) = 2.1602469) and four
    // equal rewards.
    let rewards = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0];
    let grpo = grpo_advantages(&rewards, 4);
    let expected = [-0.925_777_244_6, -0.462_888_622_3, 0.0, 1.388_665_866_9];
    for (got, want) in grpo.iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{grpo:?}");
    }
    // A group of equal rewards teaches nothing: zero advantage, no NaN.
    assert_eq!(&grpo[4..], &[0.0; 4]);
    // RLOO: each minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2.
    let rloo = rloo_advantages(&rewards, 4);
    let expected = [-8.0 / 3.0, -4.0 / 3.0, 0.0, 4.0];
    for (got, want) in rloo.iter().zip(expected) {
        assert!((got - want).abs() < 1e-12, "{rloo:?}");
    }
    assert_eq!(&rloo[4..], &[0.0; 4]);
    // Groups of 2 (sample std of 0 and 3: 3 / sqrt 2): GRPO gives 1.5 / (2.1213203 + 1e-4),
    // about 1/sqrt 2 whatever the gap; RLOO the gap itself.
    let two = grpo_advantages(&[0.0, 3.0], 2);
    assert!(
        (two[1] - 1.5 / (2.121_320_343_6 + 1e-4)).abs() < 1e-9,
        "{two:?}"
    );
    assert_eq!(two[0], -two[1]);
    assert_eq!(rloo_advantages(&[0.0, 3.0], 2), vec![-3.0, 3.0]);
}

#[test]
fn critic_free_advantages_take_the_kl_in_the_reward_and_fill_every_token() {
    // Two answers to one prompt, equal shaped rewards; the first is 0.5 nats from the
    // reference (0.5 at its first token), so with β = 1 in the reward it gets 0.5 and the other 1.
    let old = vec![vec![-1.0, -1.0], vec![-1.0]];
    let reference = vec![vec![-1.5, -1.0], vec![-1.0]];
    let fit = critic_free_advantages(rloo_advantages, &[1.0, 1.0], &old, &reference, 1.0, 2);
    assert_eq!(fit.advantages, vec![vec![-0.5, -0.5], vec![0.5]]);
    assert!((fit.kl_mean - 0.25).abs() < 1e-12);
    assert_eq!(fit.returns, vec![vec![0.0, 0.0], vec![0.0]]);
    // Without the KL in the reward the two are equal: nothing to learn.
    let fit = critic_free_advantages(grpo_advantages, &[1.0, 1.0], &old, &reference, 0.0, 2);
    assert_eq!(fit.advantages, vec![vec![0.0, 0.0], vec![0.0]]);
}

#[test]
fn k3_kl_estimate_is_zero_at_the_reference_and_positive_elsewhere() {
    let device = test_device();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [1, 3]), &device);
    let k3 = llama::model::to_host(kl_k3(t(vec![-1.0, -2.0, -0.3]), t(vec![-1.5, -2.0, -0.1])));
    // exp(-0.5) + 0.5 - 1; 0; exp(0.2) - 0.2 - 1.
    let expected = [0.106_530_659_7, 0.0, 0.021_402_758_2];
    for (got, want) in k3.iter().zip(expected) {
        assert!((f64::from(*got) - want).abs() < 1e-6, "{k3:?}");
    }
}

#[test]
fn gae_on_a_known_sequence() {
    // rewards 1, 0, 2; values 0.5, 1, 1.5; gamma 0.9, lambda 0.8.
    let (adv, ret) = gae(&[1.0, 0.0, 2.0], &[0.5, 1.0, 1.5], 0.9, 0.8);
    let d2 = 2.0 - 1.5; // terminal after the last token
    let d1 = 0.0 + 0.9 * 1.5 - 1.0;
    let d0 = 1.0 + 0.9 * 1.0 - 0.5;
    let a2 = d2;
    let a1 = d1 + 0.72 * a2;
    let a0 = d0 + 0.72 * a1;
    for (got, want) in adv.iter().zip([a0, a1, a2]) {
        assert!(close(*got, want), "{adv:?}");
    }
    for (r, (a, v)) in ret.iter().zip(adv.iter().zip([0.5, 1.0, 1.5])) {
        assert!(close(*r, a + v));
    }
    // gamma = lambda = 1: the advantage is the sum of future rewards minus the value.
    let (adv, _) = gae(&[1.0, 2.0, 3.0], &[0.0, 0.0, 0.0], 1.0, 1.0);
    assert_eq!(adv, vec![6.0, 5.0, 3.0]);
}

#[test]
fn rewards_sit_on_the_last_token_with_the_kl_penalty_on_every_token() {
    // KL per token: log pi - log pi_ref.
    let logp = [-1.0, -2.0, -0.5];
    let ref_logp = [-1.5, -2.0, -0.25];
    let kl = token_kl(&logp, &ref_logp);
    assert_eq!(kl, vec![0.5, 0.0, -0.25]);
    let rewards = token_rewards(3.0, &kl, 0.1);
    assert!(close(rewards[0], -0.05));
    assert!(close(rewards[1], 0.0));
    assert!(close(rewards[2], 3.0 + 0.025));
}

#[test]
fn clipped_policy_loss_at_the_clip_edges() {
    let device = Device::flex();
    let loss = |ratio: f64, advantage: f64| -> f64 {
        let logp = Tensor::<2>::from_floats([[ratio.ln() as f32]], &device);
        let old = Tensor::<2>::zeros([1, 1], &device);
        let adv = Tensor::<2>::from_floats([[advantage as f32]], &device);
        let mask = Tensor::<2>::ones([1, 1], &device);
        policy_loss(logp, old, adv, mask, 0.2, 1).into_scalar::<f32>() as f64
    };
    let eq = |a: f64, b: f64| (a - b).abs() < 1e-5;
    // Positive advantage: the gain is capped at ratio 1.2.
    assert!(eq(loss(1.1, 2.0), -2.2));
    assert!(eq(loss(1.5, 2.0), -2.4));
    assert!(eq(loss(0.5, 2.0), -1.0)); // below the range: not clipped (pessimistic side)
                                       // Negative advantage: capped at ratio 0.8.
    assert!(eq(loss(0.5, -1.0), 0.8));
    assert!(eq(loss(1.5, -1.0), 1.5));
    assert!(eq(loss(1.0, -1.0), 1.0));
    // The gradient vanishes beyond the edge on the clipped side.
    let logp = Tensor::<2>::from_floats([[1.5f32.ln()]], &device.clone().autodiff()).require_grad();
    let l = policy_loss(
        logp.clone(),
        Tensor::<2>::zeros([1, 1], &device.clone().autodiff()),
        Tensor::<2>::from_floats([[2.0]], &device.clone().autodiff()),
        Tensor::<2>::ones([1, 1], &device.clone().autodiff()),
        0.2,
        1,
    );
    let grads = l.backward();
    let g = logp.grad(&grads).unwrap().into_scalar::<f32>();
    assert_eq!(g, 0.0);
}

#[test]
fn clipped_value_loss_takes_the_larger_error() {
    let device = Device::flex();
    let t = |v: f32| Tensor::<2>::from_floats([[v]], &device);
    let one = Tensor::<2>::ones([1, 1], &device);
    // V moved from 0 to 1 with clip 0.2 toward return 2: unclipped error 1, clipped (0.2) 1.8.
    let l = value_loss(t(1.0), t(0.0), t(2.0), one.clone(), 0.2, 1).into_scalar::<f32>();
    assert!((l - 0.5 * 1.8 * 1.8).abs() < 1e-5);
    // Moving away from the return: the unclipped error is the larger.
    let l = value_loss(t(-1.0), t(0.0), t(2.0), one, 0.2, 1).into_scalar::<f32>();
    assert!((l - 0.5 * 9.0).abs() < 1e-5);
}

#[test]
fn the_llama2_rule_picks_safety_for_safety_prompts_and_unsafe_answers() {
    // A safe answer (sigmoid(2) = 0.88) to a helpfulness prompt: the helpfulness score.
    assert_eq!(
        combine_reward(Some(0.5), Some(2.0), false, 0.15),
        (0.5, RewardSource::Helpfulness)
    );
    // An unsafe answer (sigmoid(-2) = 0.12 < 0.15): the safety score.
    let (r, source) = combine_reward(Some(0.5), Some(-2.0), false, 0.15);
    assert_eq!(source, RewardSource::Safety);
    assert_eq!(r, -2.0, "logit(sigmoid(s)) = s");
    // A safety prompt always uses the safety score.
    assert_eq!(
        combine_reward(Some(0.5), Some(2.0), true, 0.15).1,
        RewardSource::Safety
    );
    // One model: its score.
    assert_eq!(combine_reward(Some(1.5), None, true, 0.15).0, 1.5);
    let mut v = vec![1.0, 2.0, 3.0];
    whiten(&mut v);
    assert!(v[1].abs() < 1e-9 && (v[2] - 1.224_744_871).abs() < 1e-6);
}

#[test]
fn the_adaptive_kl_controller_moves_beta_toward_the_target() {
    let mut kl = KlController {
        beta: 0.1,
        target: Some(6.0),
        horizon: 100,
    };
    kl.update(12.0, 10); // error clipped to +0.2
    assert!(close(kl.beta, 0.1 * 1.02));
    kl.update(5.4, 10); // error -0.1
    assert!(close(kl.beta, 0.1 * 1.02 * 0.99));
    let mut fixed = KlController {
        beta: 0.1,
        target: None,
        horizon: 100,
    };
    fixed.update(100.0, 10);
    assert_eq!(fixed.beta, 0.1);
}

fn rollout(prompt: &[u32], response: &[u32], ended: bool) -> Rollout {
    Rollout {
        prompt: prompt.to_vec(),
        response: response.to_vec(),
        ended,
        category: None,
        logprobs: vec![0.0; response.len()],
        entropy: 0.0,
    }
}

fn tiny_config() -> LlamaConfig {
    let mut c = llama::load_config(&test_support::tiny_test_config()).unwrap();
    c.pad_token_id = Some(0);
    c
}

fn tokenizer() -> data::Tokenizer {
    data::Tokenizer::from_file(&test_support::fixture_tokenizer_path()).unwrap()
}

#[test]
fn per_token_values_land_on_response_positions_and_scores_on_the_last_token() {
    let device = Device::flex();
    let a = rollout(&[1, 5, 6], &[7, 2], true);
    let b = rollout(&[1, 5], &[9, 9, 9, 9], false);
    let rows = [&a, &b];
    let padded = pad_rollouts(&rows, 0);
    // Responses are predicted from position 1 (row b) on, up to the last position 4: the
    // per-token tensors cover positions 1..5.
    assert_eq!((padded.offset, padded.width), (1, 4));
    let mask = llama::model::to_host(response_mask(&rows, &padded, &device));
    // Row a: tokens 7, 2 are predicted at positions 2 and 3; row b's four at 1..5.
    assert_eq!(mask, vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let placed = scatter(
        &rows,
        &[&[0.5, 3.0], &[1.0, 2.0, 3.0, 4.0]],
        &padded,
        &device,
    );
    assert_eq!(
        llama::model::to_host(placed),
        vec![0.0, 0.5, 3.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    );
    // Reward-model scores of padded rollouts equal scores of each rollout alone.
    let config = tiny_config();
    let model = llama::init_random_with_head(&config, &device, Head::Score, 4).unwrap();
    let rm = RewardModel::new(model, config.clone());
    let tok = tokenizer();
    let both = rm.score(&[a.sequence(), b.sequence()], &tok, 2).unwrap();
    let alone_a = rm.score(&[a.sequence()], &tok, 1).unwrap()[0];
    let alone_b = rm.score(&[b.sequence()], &tok, 1).unwrap()[0];
    assert!((both[0] - alone_a).abs() < 1e-5 && (both[1] - alone_b).abs() < 1e-5);
}

/// Tokens the test's reward model learns to like.
fn liked(token: u32) -> bool {
    (100..164).contains(&token)
}

/// A reward model trained to score a response by how many liked tokens it holds (on the
/// autodiff device).
fn train_reward_model(config: &LlamaConfig, ad: &Device) -> llama::Llama {
    let mut model = llama::init_random_with_head(config, ad, Head::Score, 21).unwrap();
    let train = train_section(3e-3);
    let mut optimizer = trainer::optim::adamw(&train);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut response = |n_liked: usize| -> Vec<u32> {
        let mut r: Vec<u32> = (0..8)
            .map(|_| loop {
                let t = rng.random_range(3..512u32);
                if !liked(t) {
                    break t;
                }
            })
            .collect();
        for slot in r.iter_mut().take(n_liked) {
            *slot = rng.random_range(100..164u32);
        }
        r
    };
    for _step in 0..60 {
        let items: Vec<PairItem> = (0..16)
            .map(|i| {
                let fewer = i % 3;
                let mut chosen = vec![1, 10, 11];
                chosen.extend(response(fewer + 1 + i % 2));
                let mut rejected = vec![1, 10, 11];
                rejected.extend(response(fewer));
                PairItem {
                    chosen,
                    rejected,
                    prompt_len: 3,
                    rating: None,
                    margin: None,
                }
            })
            .collect();
        let batch = PairBatch::new(&items, 0);
        let loss = reward::pair_loss(
            reward::loss::batch_scores(&model, &batch),
            &[0.0; 16],
            0.0,
            16,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads);
    }
    model
}

fn train_section(lr: f64) -> TrainSection {
    serde_json::from_value(serde_json::json!({
        "batch_size": 16, "lr": lr, "betas": [0.9, 0.95], "eps": 1e-5, "grad_clip": 1.0,
    }))
    .unwrap()
}

#[test]
fn ppo_raises_the_reward_of_a_learned_reward_model_with_bounded_kl() {
    let device = test_device();
    let config = tiny_config();
    let ad = device.clone().autodiff();
    let rm_trained = train_reward_model(&config, &ad);
    let rm = RewardModel::new(rm_trained.valid(), config.clone());
    // The reward model has learned its preference: more liked tokens, higher score.
    let tok = tokenizer();
    let plain = rollout(&[1, 10, 11], &[30, 31, 32, 33, 34, 35, 36, 37], false);
    let rich = rollout(&[1, 10, 11], &[100, 31, 120, 33, 140, 35, 160, 37], false);
    let scores = rm
        .score(&[plain.sequence(), rich.sequence()], &tok, 2)
        .unwrap();
    assert!(scores[1] > scores[0] + 1.0, "{scores:?}");

    let models = Models {
        policy: llama::init_random(&config, &ad, 8).unwrap(),
        value: Some(rm_trained),
        reference: llama::init_random(&config, &device, 8).unwrap(),
        helpfulness: Some(rm),
        safety: None,
    };
    let settings: PpoSection = serde_json::from_value(serde_json::json!({
        "reward_model": "unused", "max_new_tokens": 8, "kl_coef": 0.05,
        "whiten_reward": false, "ppo_epochs": 2, "samples": 0,
    }))
    .unwrap();
    let mut ppo = Ppo::new(models, &config, &train_section(1e-2), 8, settings);
    let prompts: Vec<Prompt> = (0..16)
        .map(|i| Prompt {
            ids: vec![1, 10 + (i % 4) as u32, 11],
            category: None,
        })
        .collect();
    let mut rewards = Vec::new();
    let mut kls = Vec::new();
    for iteration in 0..12 {
        let report = ppo.iteration(&prompts, iteration, &tok).unwrap();
        for key in [
            "entropy",
            "clip_fraction",
            "approx_kl",
            "value_loss",
            "explained_variance",
            "eos_fraction",
            "rollout_tokens_per_sec",
        ] {
            assert!(report.get(key).unwrap().is_finite(), "{key}");
        }
        rewards.push(report.reward_mean);
        kls.push(report.kl);
    }
    let early = (rewards[0] + rewards[1]) / 2.0;
    let late = (rewards[10] + rewards[11]) / 2.0;
    eprintln!("rewards {rewards:?}\nkl {kls:?}");
    assert!(late > early + 1.0, "reward should rise: {rewards:?}");
    assert!(
        kls.iter().all(|&k| k.is_finite() && k < 20.0),
        "KL bounded: {kls:?}"
    );
}

/// GRPO and RLOO, with no value model, raise the reward of the same learned reward model.
#[test]
fn critic_free_estimators_raise_the_reward_without_a_value_model() {
    let device = test_device();
    let config = tiny_config();
    let ad = device.clone().autodiff();
    let rm_trained = train_reward_model(&config, &ad);
    let tok = tokenizer();
    for estimator in ["grpo", "rloo"] {
        let models = Models {
            policy: llama::init_random(&config, &ad, 8).unwrap(),
            value: None,
            reference: llama::init_random(&config, &device, 8).unwrap(),
            helpfulness: Some(RewardModel::new(rm_trained.valid(), config.clone())),
            safety: None,
        };
        let settings: PpoSection = serde_json::from_value(serde_json::json!({
            "reward_model": "unused", "max_new_tokens": 8, "kl_coef": 0.05,
            "estimator": estimator, "group_size": 4, "whiten_reward": false,
            "ppo_epochs": 2, "samples": 0, "mini_batch_size": 8,
        }))
        .unwrap();
        let mut ppo = Ppo::new(models, &config, &train_section(1e-2), 8, settings);
        let prompts: Vec<Prompt> = (0..4)
            .map(|i| Prompt {
                ids: vec![1, 10 + i as u32, 11],
                category: None,
            })
            .collect();
        let mut rewards = Vec::new();
        for iteration in 0..12 {
            let report = ppo.iteration(&prompts, iteration, &tok).unwrap();
            assert!(report.get("value_loss").is_none(), "no value model");
            assert!(report.get("policy_loss").unwrap().is_finite());
            assert!(
                report.kl.is_finite() && report.kl < 20.0,
                "{estimator}: KL {}",
                report.kl
            );
            rewards.push(report.reward_mean);
        }
        let early = (rewards[0] + rewards[1]) / 2.0;
        let late = (rewards[10] + rewards[11]) / 2.0;
        eprintln!("{estimator} rewards {rewards:?}");
        assert!(
            late > early + 1.0,
            "{estimator}: reward should rise: {rewards:?}"
        );
    }
}

/// The policy's language-model head taken a few positions at a time (`train.loss_chunk`), the
/// policy's and value model's layers recomputed in the backward pass
/// (`train.activation_checkpointing`), and mini-batches taken a micro-batch at a time
/// (`train.micro_batch_size` below `ppo.mini_batch_size`) give the same iteration: the same log-probabilities,
/// losses, statistics, gradient norm and updated weights, to rounding.
#[test]
fn the_chunked_policy_head_gives_the_same_iteration() {
    let device = test_device();
    let config = tiny_config();
    let ad = device.clone().autodiff();
    let tok = tokenizer();
    let run = |chunk: usize, layerwise: bool, micro: usize| {
        let models = Models {
            policy: llama::init_random(&config, &ad, 8).unwrap(),
            value: Some(llama::init_random_with_head(&config, &ad, Head::Score, 9).unwrap()),
            reference: llama::init_random(&config, &device, 8).unwrap(),
            helpfulness: Some(RewardModel::new(
                llama::init_random_with_head(&config, &device, Head::Score, 10).unwrap(),
                config.clone(),
            )),
            safety: None,
        };
        let settings: PpoSection = serde_json::from_value(serde_json::json!({
            "reward_model": "unused", "max_new_tokens": 8, "samples": 0, "mini_batch_size": 4,
        }))
        .unwrap();
        let mut train = train_section(1e-2);
        train.loss_chunk = chunk;
        train.activation_checkpointing = layerwise;
        let mut ppo = Ppo::new(models, &config, &train, micro, settings);
        let prompts: Vec<Prompt> = (0..8)
            .map(|i| Prompt {
                ids: vec![1, 10 + i as u32, 11, 12],
                category: None,
            })
            .collect();
        let report = ppo.iteration(&prompts, 0, &tok).unwrap();
        let weights: Vec<f32> = llama::weights::hf_params(&ppo.policy)
            .into_iter()
            .flat_map(|(_, p)| p.to_host())
            .collect();
        (report, weights)
    };
    let (whole, whole_weights) = run(0, false, 4);
    // Also: mini-batches of 4 taken 2 and 1 rollouts at a time, gradients accumulated.
    for (chunk, layerwise, micro) in [
        (3, false, 4),
        (1, false, 4),
        (0, true, 4),
        (3, true, 4),
        (0, false, 2),
        (0, false, 1),
    ] {
        let (chunked, weights) = run(chunk, layerwise, micro);
        for key in [
            "reward_mean",
            "kl",
            "entropy",
            "policy_loss",
            "value_loss",
            "approx_kl",
            "clip_fraction",
            "grad_norm",
        ] {
            let (a, b) = (whole.get(key).unwrap(), chunked.get(key).unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "chunk {chunk}, layerwise {layerwise}, micro {micro}, {key}: {a} vs {b}"
            );
        }
        let diff = whole_weights
            .iter()
            .zip(&weights)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-5,
            "chunk {chunk}, layerwise {layerwise}, micro {micro}: weights differ by {diff}"
        );
    }
}
