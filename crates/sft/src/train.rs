//! The SFT training loop: one readable loop over optimizer steps, each made of micro-batches
//! whose gradients accumulate to the global batch.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsAccumulator;
use data::batch::{
    items_at, lengths, sequence_dataset, Dataset, SequenceBatch, SequenceDataset, SequenceItem,
};
use data::Tokenized;
use llama::{Head, Llama};
use trainer::optim::adamw;
use trainer::step::{bench_step, DeviceSum};
use trainer::{MemoryPlan, Pass, Recipe, Result, RunOptions, Session};

use crate::loss::{sft_eval_loss, sft_loss_and_grads};
use trainer::chunked::GradPlan;

/// What a finished run reports; `eval` is the last evaluation.
pub type Summary = trainer::Summary<f64>;

fn sequences(items: Vec<data::Item>, recipe: &Recipe) -> SequenceDataset {
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    sequence_dataset(&examples, recipe.data.max_seq_len, recipe.data.packing)
}

/// Mean token loss over a dataset, without gradients.
fn evaluate(
    model: &Llama,
    dataset: &SequenceDataset,
    batch_size: usize,
    pad: u32,
    chunk: usize,
) -> f64 {
    let all: Vec<usize> = (0..dataset.len()).collect();
    let batches: Vec<SequenceBatch> = all
        .chunks(batch_size.max(1))
        .map(|chunk| SequenceBatch::new(&items_at(dataset, chunk), pad))
        .collect();
    let total: usize = batches.iter().map(SequenceBatch::trained_tokens).sum();
    batches
        .iter()
        .map(|b| sft_eval_loss(model, b, total, chunk))
        .sum()
}

/// The memory plan of SFT: the model trained on micro-batches of `data.max_seq_len` positions
/// through the language-model head.
pub fn memory_plan(recipe: &Recipe, config: &llama::LlamaConfig) -> MemoryPlan {
    let pass = Pass {
        rows: recipe.micro_batch_size(),
        positions: recipe.data.max_seq_len,
        lm_head: true,
    };
    MemoryPlan::for_recipe(config, pass, recipe)
}

/// Runs supervised fine-tuning as the recipe says.
pub fn run(recipe: &Recipe, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let mut session = Session::open(recipe, options)?;
    let data = session.data()?;
    let train_set = sequences(data.train, recipe);
    let eval_set = sequences(data.eval, recipe);
    session.check_one_batch(train_set.len(), "sequences")?;
    let (config, mut model) = session.model(Head::Lm)?;
    session.check_memory(&memory_plan(recipe, &config))?;
    let finished = Summary::finished(&session, train_set.len());
    let Some((mut run, mut optimizer)) = session.start(train_set.len())? else {
        return Ok(finished);
    };
    let total_steps = run.total;
    let mut batches = run.batches(lengths(&train_set));
    let micro = recipe.micro_batch_size();
    let pad = config.pad_token_id.unwrap_or(0);
    let chunk = train.loss_chunk;
    let plan = GradPlan::for_recipe(recipe);
    let mut last_loss = f64::NAN;
    let mut eval_loss = None;
    let mut checkpoint = PathBuf::new();

    for step in run.start..total_steps {
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
        for (m, batch) in micro_batches.iter().enumerate() {
            let pass = plan.at(&[step as u64, m as u64]);
            let (loss, grads) = sft_loss_and_grads(&model, batch, trained, pass);
            step_loss.add(loss);
            accumulator.accumulate(&model, grads);
            run.count(batch.tokens.iter().map(Vec::len).sum(), batch.tokens.len());
        }
        let loss_value = step_loss.read();
        let stepped = run.optimizer_step(&mut optimizer, model, accumulator, step, loss_value)?;
        let values = [("trained_tokens", trained as f64), ("epoch", epoch as f64)];
        run.log_step(step, loss_value, &stepped, &values, None)?;
        model = stepped.model;
        last_loss = loss_value;
        let done = step + 1;
        if !eval_set.is_empty() && run.due(done, train.eval_every) {
            let loss = evaluate(&model.valid(), &eval_set, micro, pad, chunk);
            run.log(
                "eval",
                done,
                &[("eval_loss", loss), ("eval_perplexity", loss.exp())],
            )?;
            eval_loss = Some(loss);
        }
        if run.due(done, train.save_every) {
            checkpoint = run.save(done, &model, &config, &optimizer, |_, _| Ok(()))?;
        }
    }
    run.finish(&checkpoint);
    Ok(Summary {
        steps: total_steps,
        final_loss: last_loss,
        eval: eval_loss,
        checkpoint,
    })
}

/// What `train bench sft` measured, with what the throughput is set against.
pub struct BenchReport {
    pub tokens_per_sec: f64,
    pub config: llama::LlamaConfig,
    /// Parameters that take gradients (with LoRA: the adapters).
    pub trained_parameters: usize,
    /// Model FLOPs of one trained token (see `LlamaConfig::training_flops_per_token`).
    pub flops_per_token: f64,
    pub plan: MemoryPlan,
}

/// Tokens/s of full training steps (forward, loss, backward, clipping, AdamW) on random full-length
/// sequences of the recipe's batch shape, after one warm-up step. A benchmark, not a test.
pub fn bench(recipe: &Recipe, steps: usize) -> Result<BenchReport> {
    use rand::{Rng, SeedableRng};
    let train = &recipe.train;
    let device = trainer::session::training_device(recipe)?;
    let (config, mut model) = trainer::session::bench_model(recipe, &device, Head::Lm)?;
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
            let (_, grads) = sft_loss_and_grads(&model, batch, trained, GradPlan::new(train));
            accumulator.accumulate(&model, grads);
        }
        model = bench_step(recipe, &mut optimizer, model, accumulator);
        if step > 0 {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok(BenchReport {
        tokens_per_sec: (steps * train.batch_size * len) as f64 / timed.max(1e-9),
        trained_parameters: match recipe.lora {
            Some(_) => llama::lora::trainable_parameters(&model),
            None => config.parameter_count() as usize,
        },
        flops_per_token: config.training_flops_per_token(len, recipe.lora.is_none()),
        plan: memory_plan(recipe, &config),
        config,
    })
}
