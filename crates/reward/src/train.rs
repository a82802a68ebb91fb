//! The reward-model training loop: the SFT loop's shape (micro-batches accumulating to the
//! global batch, global-norm clipping, AdamW, schedule, atomic checkpoints, exact resume), with
//! pairs instead of sequences. `train.batch_size` counts pairs; each pair is two sequences.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsAccumulator;
use data::batch::{items_at, lengths, pair_dataset, Dataset, PairBatch, PairDataset, PairItem};
use data::Tokenized;
use llama::{Head, Llama};
use trainer::optim::adamw;
use trainer::step::{bench_step, DeviceSum};
use trainer::{MemoryPlan, Pass, Recipe, Result, RunOptions, Session, TrainError};

use crate::eval::{score_dataset, PairEval, RewardStats};
use crate::loss::{batch_scores, pair_loss_and_grads, pair_margins};
use crate::model::reward_pad_id;
use crate::section::RewardSection;
use trainer::chunked::GradPlan;

/// What a finished run reports; `eval` is the last evaluation.
pub type Summary = trainer::Summary<PairEval>;

fn pairs(items: Vec<data::Item>) -> PairDataset {
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    pair_dataset(&examples)
}

/// The memory plan of reward-model training: both answers of each pair of a micro-batch in one
/// pass of `data.max_seq_len` positions, through the scalar head.
pub fn memory_plan(recipe: &Recipe, config: &llama::LlamaConfig) -> MemoryPlan {
    let pass = Pass {
        rows: 2 * recipe.micro_batch_size(),
        positions: recipe.data.max_seq_len,
        lm_head: false,
    };
    MemoryPlan::for_recipe(config, pass, recipe)
}

/// Trains a reward model as the recipe and its `[reward]` section say.
pub fn run(recipe: &Recipe, section: &RewardSection, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let mut session = Session::open(recipe, options)?;
    let data = session.data()?;
    let train_set = pairs(data.train);
    let eval_set = pairs(data.eval);
    if train_set.is_empty() {
        return Err(TrainError::Invalid(
            "the training data holds no preference pairs (a reward model needs `chosen` and \
             `rejected` answers: formats preference or hh-rlhf)"
                .into(),
        ));
    }
    session.check_one_batch(train_set.len(), "pairs")?;
    let (mut config, mut model) = session.model(Head::Score)?;
    session.check_memory(&memory_plan(recipe, &config))?;
    let pad = reward_pad_id(&config);
    config.pad_token_id = Some(pad);
    let finished = Summary::finished(&session, train_set.len());
    let Some((mut run, mut optimizer)) = session.start(train_set.len())? else {
        return Ok(finished);
    };
    let total_steps = run.total;
    let mut batches = run.batches(lengths(&train_set));
    let micro = recipe.micro_batch_size();
    let plan = GradPlan::for_recipe(recipe);
    // The latest evaluation and the step it measured.
    let mut last_eval: Option<(usize, PairEval)> = None;
    let mut last_loss = f64::NAN;
    let mut checkpoint = PathBuf::new();

    for step in run.start..total_steps {
        let (epoch, indices) = batches.batch(step);
        let items = items_at(&train_set, &indices);
        let global_pairs = items.len();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut step_loss = DeviceSum::default();
        let mut step_right = DeviceSum::default();
        for (m, chunk) in items.chunks(micro).enumerate() {
            let batch = PairBatch::new(chunk, pad);
            let margins = pair_margins(&batch, section);
            let n = chunk.len();
            let (loss, grads, right) = pair_loss_and_grads(
                &model,
                &batch,
                &margins,
                section.centering,
                global_pairs,
                plan.at(&[step as u64, m as u64]),
            );
            step_right.add(right);
            step_loss.add(loss);
            accumulator.accumulate(&model, grads);
            run.count(batch.valid.iter().flatten().filter(|&&v| v).count(), n);
        }
        let loss_value = step_loss.read();
        let accuracy = step_right.read() / global_pairs.max(1) as f64;
        let stepped = run.optimizer_step(&mut optimizer, model, accumulator, step, loss_value)?;
        let values = [("accuracy", accuracy), ("epoch", epoch as f64)];
        run.log_step(step, loss_value, &stepped, &values, Some("pairs_per_sec"))?;
        model = stepped.model;
        last_loss = loss_value;
        let done = step + 1;
        if !eval_set.is_empty() && run.due(done, train.eval_every) {
            let eval = evaluate(&model, &eval_set, micro, pad, section)?;
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
            run.log("eval", done, &values)?;
            last_eval = Some((done, eval));
        }
        if run.due(done, train.save_every) {
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
                    RewardStats::from_eval(&evaluate(&model, pairs, micro, pad, section)?)
                }
            };
            checkpoint = run.save(done, &model, &config, &optimizer, |dir, _| stats.save(dir))?;
        }
    }
    run.finish(&checkpoint);
    Ok(Summary {
        steps: total_steps,
        final_loss: last_loss,
        eval: last_eval.map(|(_, eval)| eval),
        checkpoint,
    })
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

/// Pairs/s of reward training steps (forward of both answers, loss, backward, clipping, AdamW)
/// and of scoring without gradients, on random full-length pairs of the recipe's batch shape,
/// each after one warm-up step. A benchmark, not a test.
pub fn bench(recipe: &Recipe, steps: usize) -> Result<(f64, f64)> {
    use rand::{Rng, SeedableRng};
    let train = &recipe.train;
    let device = trainer::session::training_device(recipe)?;
    let (config, mut model) = trainer::session::bench_model(recipe, &device, Head::Score)?;
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
            let plan = GradPlan::new(train);
            let (_, grads, _) =
                pair_loss_and_grads(&model, batch, &margins, 0.0, items.len(), plan);
            accumulator.accumulate(&model, grads);
        }
        model = bench_step(recipe, &mut optimizer, model, accumulator);
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
