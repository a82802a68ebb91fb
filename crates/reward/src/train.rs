//! The reward-model training loop: the SFT loop's shape (micro-batches accumulating to the
//! global batch, global-norm clipping, AdamW, schedule, atomic checkpoints, exact resume), with
//! pairs instead of sequences. `train.batch_size` counts pairs; each pair is two sequences.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use data::batch::{items_at, Dataset, PairBatch, PairDataset, PairItem};
use data::{Tokenized, Tokenizer};
use llama::{Head, Llama, LlamaConfig};
use trainer::optim::{adamw, clip_grad_norm};
use trainer::recipe::RewardSection;
use trainer::run::{io_err, Result, RunOptions, TrainError, TrainerState};
use trainer::step::{due, optimizer_step, DeviceSum, EpochBatches};
use trainer::Recipe;

use crate::eval::{score_dataset, PairEval, RewardStats};
use crate::loss::{batch_scores, pair_loss, pair_margins};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f64,
    pub eval: Option<PairEval>,
    pub checkpoint: PathBuf,
}

fn pairs(items: Vec<data::Item>) -> PairDataset {
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    PairDataset::new(&examples)
}

/// The pad id of reward batches: the config's, else 0 (`<unk>` in Llama 2's vocabulary, never
/// produced by its byte-fallback tokenizer). Transformers finds the last real token by it, so
/// it must not be EOS, which ends every answer.
pub fn reward_pad_id(config: &LlamaConfig) -> u32 {
    config.pad_token_id.unwrap_or(0)
}

/// Trains a reward model as the recipe says.
pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let section = recipe.reward.clone().unwrap_or_default();
    let device = llama::parse_device(&recipe.runtime.device)?.autodiff();
    let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
    let out = &recipe.output.dir;
    let (lock, resume) = trainer::run::check_output(recipe, options)?;

    let data = trainer::run::load_recipe_data(recipe, &tokenizer)?;
    let train_set = pairs(data.train);
    let eval_set = pairs(data.eval);
    if train_set.is_empty() {
        return Err(TrainError::Invalid(
            "the training data holds no preference pairs (a reward model needs `chosen` and \
             `rejected` answers: formats preference or hh-rlhf)"
                .into(),
        ));
    }
    trainer::run::check_one_batch(train_set.len(), recipe, "pairs")?;
    let (mut config, mut model, state) =
        trainer::run::load_or_resume(recipe, &device, Head::Score, resume.as_deref(), &tokenizer)?;
    trainer::run::check_vocab(&tokenizer, &config, &recipe.model.tokenizer)?;
    trainer::run::check_context(recipe, &config)?;
    let pad = reward_pad_id(&config);
    config.pad_token_id = Some(pad);
    let total_steps = trainer::run::total_steps(recipe, train_set.len());
    let Some(start_step) = trainer::run::start_step(state.as_ref(), total_steps, resume.as_deref())
    else {
        return Ok(Summary {
            steps: total_steps,
            final_loss: f64::NAN,
            eval: None,
            checkpoint: resume.unwrap_or_default(),
        });
    };
    let mut optimizer = trainer::run::optimizer(recipe, resume.as_deref())?;
    trainer::run::start_output(recipe, &lock, resume.is_some())?;

    let metrics_path = out.join("metrics.jsonl");
    let mut metrics =
        trainer::metrics::MetricsLogger::open(out, start_step, total_steps).map_err(io_err(out))?;
    let mut batches = EpochBatches::new(train_set.lengths(), recipe);
    let micro = recipe.micro_batch_size();
    if let Some(dir) = &resume {
        eprintln!("resuming from {} at step {start_step}", dir.display());
    }
    // The latest evaluation and the step it measured.
    let mut last_eval: Option<(usize, PairEval)> = None;
    let started = Instant::now();
    let mut window_pairs = 0usize;
    let mut window_tokens = 0usize;
    let mut window_start = Instant::now();

    for step in start_step..total_steps {
        let (epoch, indices) = batches.batch(step);
        let items = items_at(&train_set, &indices);
        let global_pairs = items.len();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut step_loss = DeviceSum::default();
        let mut step_right = DeviceSum::default();
        for chunk in items.chunks(micro) {
            let batch = PairBatch::new(chunk, pad);
            let margins = pair_margins(&batch, &section);
            let scores = batch_scores(&model, &batch);
            let n = chunk.len();
            let detached = scores.clone().detach();
            step_right.add(
                detached
                    .clone()
                    .slice(0..n)
                    .greater(detached.slice(n..2 * n))
                    .float()
                    .sum(),
            );
            let loss = pair_loss(scores, &margins, section.centering, global_pairs);
            step_loss.add(loss.clone());
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            window_pairs += n;
            window_tokens += batch.valid.iter().flatten().filter(|&&v| v).count();
        }
        let loss_value = step_loss.read();
        let accuracy = step_right.read() / global_pairs.max(1) as f64;
        let stepped = optimizer_step(
            recipe,
            &mut optimizer,
            model,
            accumulator,
            step,
            total_steps,
            loss_value,
        )?;
        model = stepped.model;
        let (lr, grad_norm) = (stepped.lr, stepped.grad_norm);

        let done = step + 1;
        metrics.progress(done);
        if due(done, train.log_every.max(1), total_steps) {
            let seconds = window_start.elapsed().as_secs_f64().max(1e-9);
            metrics
                .log(
                    "train",
                    done,
                    &[
                        ("loss", loss_value),
                        ("accuracy", accuracy),
                        ("lr", lr),
                        ("grad_norm", grad_norm),
                        ("pairs_per_sec", window_pairs as f64 / seconds),
                        ("tokens_per_sec", window_tokens as f64 / seconds),
                        ("epoch", epoch as f64),
                    ],
                )
                .map_err(io_err(&metrics_path))?;
            window_pairs = 0;
            window_tokens = 0;
            window_start = Instant::now();
        }
        if !eval_set.is_empty() && due(done, train.eval_every, total_steps) {
            let eval = evaluate(&model, &eval_set, micro, pad, &section)?;
            let mut values = vec![
                ("eval_loss", eval.loss),
                ("eval_accuracy", eval.accuracy),
                ("eval_mean_margin", eval.mean_margin),
                ("eval_reward_mean", eval.reward_mean),
                ("eval_reward_std", eval.reward_std),
            ];
            let bucket_keys: Vec<String> = eval
                .per_bucket
                .keys()
                .map(|k| format!("eval_accuracy/{k}"))
                .collect();
            for (key, bucket) in bucket_keys.iter().zip(eval.per_bucket.values()) {
                values.push((key.as_str(), bucket.accuracy));
            }
            metrics
                .log("eval", done, &values)
                .map_err(io_err(&metrics_path))?;
            last_eval = Some((done, eval));
        }
        let last = done == total_steps;
        if due(done, train.save_every, total_steps) {
            // The statistics of exactly these weights: the evaluation of this step, else a
            // fresh one (on the eval split, or on the training pairs without one).
            let stats = match &last_eval {
                Some((step, eval)) if *step == done => RewardStats::from_eval(eval),
                _ => {
                    let pairs = if eval_set.is_empty() {
                        &train_set
                    } else {
                        &eval_set
                    };
                    RewardStats::from_eval(&evaluate(&model, pairs, micro, pad, &section)?)
                }
            };
            let dir = save(
                &model,
                &optimizer,
                &config,
                recipe,
                done,
                total_steps,
                stats,
            )?;
            if last {
                metrics.finish();
                eprintln!(
                    "finished {total_steps} steps in {:.1} s; checkpoint {}",
                    started.elapsed().as_secs_f64(),
                    dir.display()
                );
                return Ok(Summary {
                    steps: total_steps,
                    final_loss: loss_value,
                    eval: last_eval.map(|(_, eval)| eval),
                    checkpoint: dir,
                });
            }
        }
    }
    unreachable!("the loop returns at its last step")
}

fn evaluate(
    model: &Llama,
    dataset: &PairDataset,
    batch_pairs: usize,
    pad: u32,
    section: &RewardSection,
) -> Result<PairEval> {
    Ok(PairEval::from_scores(&score_dataset(
        &model.valid(),
        dataset,
        batch_pairs,
        pad,
        section,
    )?))
}

fn save(
    model: &Llama,
    optimizer: &burn::optim::ModuleOptimizer,
    config: &LlamaConfig,
    recipe: &Recipe,
    step: usize,
    total_steps: usize,
    stats: RewardStats,
) -> Result<PathBuf> {
    trainer::run::save_checkpoint(recipe, step, |dir| {
        trainer::run::write_model(model, config, recipe, dir)?;
        stats.save(dir)?;
        let state = TrainerState {
            step,
            total_steps,
            seed: recipe.train.seed,
            param_ids: llama::model::param_ids(model),
            extra: serde_json::Value::Null,
        };
        trainer::run::write_training_state(dir, optimizer, &state)
    })
}

/// Pairs/s of reward training steps (forward of both answers, loss, backward, clipping, AdamW)
/// and of scoring without gradients, on random full-length pairs of the recipe's batch shape,
/// each after one warm-up step. A benchmark, not a test.
pub fn bench(recipe: &Recipe, steps: usize) -> Result<(f64, f64)> {
    use rand::{Rng, SeedableRng};
    let train = &recipe.train;
    let device = llama::parse_device(&recipe.runtime.device)?.autodiff();
    let (config, mut model) = trainer::run::load_model(recipe, &device, Head::Score)?;
    let mut optimizer = adamw(train);
    let mut rng = rand::rngs::StdRng::seed_from_u64(train.seed);
    let len = recipe.data.max_seq_len;
    let mut random = || -> Vec<u32> {
        (0..len)
            .map(|_| rng.random_range(3..config.vocab_size as u32))
            .collect()
    };
    let items: Vec<PairItem> = (0..train.batch_size)
        .map(|_| PairItem {
            chosen: random(),
            rejected: random(),
            prompt_len: 0,
            rating: None,
            margin: None,
        })
        .collect();
    let batches: Vec<PairBatch> = items
        .chunks(recipe.micro_batch_size())
        .map(|c| PairBatch::new(c, 0))
        .collect();
    let section = RewardSection::default();
    let mut train_time = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        for batch in &batches {
            let margins = pair_margins(batch, &section);
            let loss = pair_loss(batch_scores(&model, batch), &margins, 0.0, items.len());
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let mut grads = accumulator.grads();
        clip_grad_norm(&model, &mut grads, train.grad_clip);
        model = optimizer.step(train.lr, model, grads);
        // Reading a parameter back waits for the step to finish on asynchronous backends.
        let _ = llama::model::to_host(model.norm.gamma.val());
        if step > 0 {
            train_time += start.elapsed().as_secs_f64();
        }
    }
    let frozen = model.valid();
    let mut score_time = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        for batch in &batches {
            let _ = llama::model::to_host(batch_scores(&frozen, batch));
        }
        if step > 0 {
            score_time += start.elapsed().as_secs_f64();
        }
    }
    let pairs = (steps * items.len()) as f64;
    Ok((pairs / train_time.max(1e-9), pairs / score_time.max(1e-9)))
}
