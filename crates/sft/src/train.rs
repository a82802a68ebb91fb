//! The SFT training loop: one readable loop over optimizer steps, each made of micro-batches
//! whose gradients accumulate to the global batch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use data::batch::{items_at, Dataset, SequenceBatch, SequenceDataset, SequenceItem};
use data::{Tokenized, Tokenizer};
use llama::{Head, Llama, LlamaConfig};
use trainer::optim::{adamw, clip_grad_norm};
use trainer::step::{due, optimizer_step, DeviceSum, EpochBatches};
use trainer::Recipe;

use crate::loss::sft_loss;

pub use trainer::run::{find_checkpoint, RunOptions, TrainError as SftError, TrainerState};
use trainer::run::{io_err, Result};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub checkpoint: PathBuf,
}

fn sequences(items: Vec<data::Item>, recipe: &Recipe) -> SequenceDataset {
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    SequenceDataset::new(&examples, recipe.data.max_seq_len, recipe.data.packing)
}

/// Mean token loss over a dataset, without gradients.
fn evaluate(model: &Llama, dataset: &SequenceDataset, batch_size: usize, pad: u32) -> f64 {
    let all: Vec<usize> = (0..dataset.len()).collect();
    let batches: Vec<SequenceBatch> = all
        .chunks(batch_size.max(1))
        .map(|chunk| SequenceBatch::new(&items_at(dataset, chunk), pad))
        .collect();
    let total: usize = batches.iter().map(SequenceBatch::trained_tokens).sum();
    batches
        .iter()
        .map(|b| sft_loss(model, b, total).into_scalar::<f32>() as f64)
        .sum()
}

fn metrics_file(out: &Path) -> PathBuf {
    out.join("metrics.jsonl")
}

/// Runs supervised fine-tuning as the recipe says.
pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let device = llama::parse_device(&recipe.runtime.device)?.autodiff();
    let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
    let out = &recipe.output.dir;
    let (lock, resume) = trainer::run::check_output(recipe, options)?;

    let data = trainer::run::load_recipe_data(recipe, &tokenizer)?;
    let train_set = sequences(data.train, recipe);
    let eval_set = sequences(data.eval, recipe);
    trainer::run::check_one_batch(train_set.len(), recipe, "sequences")?;
    let (config, mut model, state) =
        trainer::run::load_or_resume(recipe, &device, Head::Lm, resume.as_deref(), &tokenizer)?;
    trainer::run::check_vocab(&tokenizer, &config, &recipe.model.tokenizer)?;
    trainer::run::check_context(recipe, &config)?;
    let total_steps = trainer::run::total_steps(recipe, train_set.len());
    let Some(start_step) = trainer::run::start_step(state.as_ref(), total_steps, resume.as_deref())
    else {
        return Ok(Summary {
            steps: total_steps,
            final_loss: f64::NAN,
            eval_loss: None,
            checkpoint: resume.unwrap_or_default(),
        });
    };
    let mut optimizer = trainer::run::optimizer(recipe, resume.as_deref())?;
    trainer::run::start_output(recipe, &lock, resume.is_some())?;
    let mut metrics =
        trainer::metrics::MetricsLogger::open(out, start_step, total_steps).map_err(io_err(out))?;

    let mut batches = EpochBatches::new(train_set.lengths(), recipe);
    let micro = recipe.micro_batch_size();
    let pad = config.pad_token_id.unwrap_or(0);
    if let Some(dir) = &resume {
        eprintln!("resuming from {} at step {start_step}", dir.display());
    }
    let mut last_loss = f64::NAN;
    let mut eval_loss = None;
    let started = Instant::now();
    let mut window_tokens = 0usize;
    let mut window_start = Instant::now();

    for step in start_step..total_steps {
        let (epoch, indices) = batches.batch(step);
        let items = items_at(&train_set, &indices);
        let micro_batches: Vec<SequenceBatch> = items
            .chunks(micro)
            .map(|chunk| SequenceBatch::new(chunk, pad))
            .collect();
        let trained: usize = micro_batches
            .iter()
            .map(SequenceBatch::trained_tokens)
            .sum();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut step_loss = DeviceSum::default();
        for batch in &micro_batches {
            let loss = sft_loss(&model, batch, trained);
            step_loss.add(loss.clone());
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            window_tokens += batch.tokens.iter().map(Vec::len).sum::<usize>();
        }
        let loss_value = step_loss.read();
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
        last_loss = loss_value;

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
                        ("lr", stepped.lr),
                        ("grad_norm", stepped.grad_norm),
                        ("tokens_per_sec", window_tokens as f64 / seconds),
                        ("trained_tokens", trained as f64),
                        ("epoch", epoch as f64),
                    ],
                )
                .map_err(io_err(metrics_file(out).as_path()))?;
            window_tokens = 0;
            window_start = Instant::now();
        }
        if !eval_set.is_empty() && due(done, train.eval_every, total_steps) {
            let loss = evaluate(&model.valid(), &eval_set, micro, pad);
            metrics
                .log(
                    "eval",
                    done,
                    &[("eval_loss", loss), ("eval_perplexity", loss.exp())],
                )
                .map_err(io_err(metrics_file(out).as_path()))?;
            eval_loss = Some(loss);
        }
        if due(done, train.save_every, total_steps) && done != total_steps {
            save(&model, &optimizer, &config, recipe, done, total_steps)?;
        }
    }
    let checkpoint = save(
        &model,
        &optimizer,
        &config,
        recipe,
        total_steps,
        total_steps,
    )?;
    metrics.finish();
    eprintln!(
        "finished {total_steps} steps in {:.1} s; checkpoint {}",
        started.elapsed().as_secs_f64(),
        checkpoint.display()
    );
    Ok(Summary {
        steps: total_steps,
        final_loss: last_loss,
        eval_loss,
        checkpoint,
    })
}

/// Writes `<output.dir>/checkpoint-<step>`: the model, the optimizer and the trainer state.
fn save(
    model: &Llama,
    optimizer: &burn::optim::ModuleOptimizer,
    config: &LlamaConfig,
    recipe: &Recipe,
    step: usize,
    total_steps: usize,
) -> Result<PathBuf> {
    trainer::run::save_checkpoint(recipe, step, |dir| {
        trainer::run::write_model(model, config, recipe, dir)?;
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

/// Tokens/s of full training steps (forward, loss, backward, clipping, AdamW) on random full-length
/// sequences of the recipe's batch shape, after one warm-up step. A benchmark, not a test.
pub fn bench(recipe: &Recipe, steps: usize) -> Result<f64> {
    use rand::{Rng, SeedableRng};
    let train = &recipe.train;
    let device = llama::parse_device(&recipe.runtime.device)?.autodiff();
    let (config, mut model) = trainer::run::load_model(recipe, &device, Head::Lm)?;
    let mut optimizer = adamw(train);
    let mut rng = rand::rngs::StdRng::seed_from_u64(train.seed);
    let len = recipe.data.max_seq_len;
    let items: Vec<SequenceItem> = (0..train.batch_size)
        .map(|_| {
            let ids: Vec<u32> = (0..len)
                .map(|_| rng.random_range(3..config.vocab_size as u32))
                .collect();
            SequenceItem {
                trained: vec![true; len],
                positions: (0..len).collect(),
                segments: vec![0; len],
                ids,
            }
        })
        .collect();
    let micro_batches: Vec<SequenceBatch> = items
        .chunks(recipe.micro_batch_size())
        .map(|c| SequenceBatch::new(c, 0))
        .collect();
    let trained: usize = micro_batches
        .iter()
        .map(SequenceBatch::trained_tokens)
        .sum();
    let mut timed = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        for batch in &micro_batches {
            let loss = sft_loss(&model, batch, trained);
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let mut grads = accumulator.grads();
        clip_grad_norm(&model, &mut grads, train.grad_clip);
        model = optimizer.step(train.lr, model, grads);
        // Reading a parameter back waits for the step to finish on asynchronous backends.
        let _ = llama::model::to_host(model.norm.gamma.val());
        if step > 0 {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok((steps * train.batch_size * len) as f64 / timed.max(1e-9))
}
