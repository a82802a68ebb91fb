//! `train dpo`: the reward loop's shape (micro-batches accumulating to the global batch of
//! pairs, clipping, AdamW, schedule, atomic checkpoints, exact resume) with the policy's
//! language-model head and a frozen reference, or the reference's log-probabilities computed
//! once and kept with the run.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::GradientsAccumulator;
use data::batch::{items_at, lengths, Dataset};
use data::Tokenized;
use llama::{Head, Llama, LlamaConfig};
use serde::{Deserialize, Serialize};
use trainer::chunked::GradPlan;
use trainer::session::{load_model, with_precision};
use trainer::{io_err, MemoryPlan, Pass, Recipe, Result, RunOptions, Session, TrainError};

use crate::logps::{dpo_dataset, logps_and_grads, sequence_logps, DpoBatch, DpoDataset};
use crate::loss::{as_used, pair_loss, PairMetrics};
use crate::section::DpoSection;

/// What a finished run reports; `eval` is the last evaluation.
pub type Summary = trainer::Summary<PairMetrics>;

/// The reference's log-probabilities of every pair, kept with the run (`precompute_reference`).
pub const REFERENCE_FILE: &str = "reference_logps.json";

/// Summed answer log-probabilities `[chosen, rejected]` of every training and evaluation pair
/// under the reference, in dataset order, with a fingerprint of the pairs' tokens and masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Precomputed {
    pub data: String,
    pub train: Vec<[f64; 2]>,
    pub eval: Vec<[f64; 2]>,
}

/// FNV-1a over every pair's ids and trained masks, split by split: the same data in the same
/// order gives the same string on every platform and Rust version.
fn data_fingerprint(train: &DpoDataset, eval: &DpoDataset) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |value: u64| {
        for byte in value.to_le_bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for dataset in [train, eval] {
        feed(dataset.len() as u64);
        for item in dataset.iter().flatten() {
            for sequence in [&item.chosen, &item.rejected] {
                feed(sequence.ids.len() as u64);
                for (&id, &trained) in sequence.ids.iter().zip(&sequence.trained) {
                    feed(u64::from(id) << 1 | u64::from(trained));
                }
            }
        }
    }
    format!("{hash:016x}")
}

impl Precomputed {
    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(REFERENCE_FILE);
        let partial = dir.join(format!("{REFERENCE_FILE}.partial"));
        let text = serde_json::to_string(self).map_err(|e| TrainError::Invalid(e.to_string()))?;
        std::fs::write(&partial, text).map_err(io_err(&partial))?;
        std::fs::rename(&partial, &path).map_err(io_err(&path))
    }

    /// The log-probabilities saved in `dir`, which must be of this data (the same pairs, tokens
    /// and masks, in the same order).
    fn read(dir: &Path, train: &DpoDataset, eval: &DpoDataset) -> Result<Self> {
        let path = dir.join(REFERENCE_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let saved: Self = serde_json::from_str(&text)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
        let (pairs, held_out) = (train.len(), eval.len());
        if saved.train.len() != pairs
            || saved.eval.len() != held_out
            || saved.data != data_fingerprint(train, eval)
        {
            return Err(TrainError::Invalid(format!(
                "{}: computed for other pairs ({} training and {} evaluation; the data now has \
                 {pairs} and {held_out}, or other tokens): resume with the data, tokenizer and \
                 max_seq_len the run was trained with",
                path.display(),
                saved.train.len(),
                saved.eval.len()
            )));
        }
        Ok(saved)
    }
}

/// Where a batch's reference log-probabilities come from.
enum Reference {
    Model(Box<Llama>),
    Precomputed(Precomputed),
}

impl Reference {
    /// Per-row `[chosen rows..., rejected rows...]` sums of `batch`, whose pairs are at
    /// `indices` of the training (`eval == false`) or evaluation split.
    fn logps(&self, batch: &DpoBatch, indices: &[usize], eval: bool, chunk: usize) -> Vec<f64> {
        match self {
            Reference::Model(model) => sequence_logps(model, batch, chunk),
            Reference::Precomputed(saved) => {
                let split = if eval { &saved.eval } else { &saved.train };
                let pairs: Vec<[f64; 2]> = indices.iter().map(|&i| split[i]).collect();
                pairs
                    .iter()
                    .map(|p| p[0])
                    .chain(pairs.iter().map(|p| p[1]))
                    .collect()
            }
        }
    }
}

/// The memory plan of DPO: both answers of each pair of a micro-batch in one pass of
/// `data.max_seq_len` positions through the language-model head, and a frozen reference model
/// unless its log-probabilities are precomputed or it is the LoRA policy's own base.
pub fn memory_plan(recipe: &Recipe, section: &DpoSection, config: &LlamaConfig) -> MemoryPlan {
    let pass = Pass {
        rows: 2 * recipe.micro_batch_size(),
        positions: recipe.data.max_seq_len,
        lm_head: true,
    };
    let plan = MemoryPlan::for_recipe(config, pass, recipe);
    let own_base = recipe.lora.is_some() && section.reference.is_none();
    if section.precompute_reference || own_base {
        plan
    } else {
        plan.and(MemoryPlan::frozen_as(config, recipe.runtime.precision()))
    }
}

/// The reference model: `dpo.reference`, else with LoRA the policy's base without its adapters,
/// else the starting model loaded again (also when resuming).
fn reference_model(
    session: &Session,
    section: &DpoSection,
    policy: &Llama,
    config: &LlamaConfig,
) -> Result<Llama> {
    let recipe = session.recipe;
    let inner = session.inference_device();
    match (&section.reference, &recipe.lora) {
        (Some(dir), _) => {
            let (theirs, model) =
                llama::load_pretrained_as(dir, &inner, Head::Lm, recipe.train.seed)?;
            let tokenizer = dir.join("tokenizer.json");
            if tokenizer.is_file()
                && !data::Tokenizer::from_file(&tokenizer)?.same_vocabulary(&session.tokenizer)
            {
                return Err(TrainError::Invalid(format!(
                    "{}: the reference model's tokenizer differs from the policy's ({})",
                    tokenizer.display(),
                    recipe.model.tokenizer.display()
                )));
            }
            if theirs.vocab_size != config.vocab_size {
                return Err(TrainError::Invalid(format!(
                    "{}: the reference model's vocabulary has {} ids, the policy's {}",
                    dir.join("config.json").display(),
                    theirs.vocab_size,
                    config.vocab_size
                )));
            }
            let max_seq_len = recipe.data.max_seq_len;
            if theirs.context_length() < max_seq_len {
                return Err(TrainError::Invalid(format!(
                    "{}: the reference model's context is {} tokens, shorter than \
                     data.max_seq_len {max_seq_len}",
                    dir.join("config.json").display(),
                    theirs.context_length()
                )));
            }
            Ok(with_precision(recipe, model))
        }
        (None, Some(_)) => Ok(llama::lora::without_adapters(&policy.valid())),
        (None, None) => Ok(with_precision(
            recipe,
            load_model(recipe, &inner, Head::Lm)?.1,
        )),
    }
}

/// The reference's summed log-probabilities of every pair of `dataset`.
fn precompute(
    model: &Llama,
    dataset: &DpoDataset,
    micro: usize,
    pad: u32,
    chunk: usize,
) -> Vec<[f64; 2]> {
    let all: Vec<usize> = (0..dataset.len()).collect();
    let mut out = Vec::with_capacity(dataset.len());
    let bar = trainer::metrics::work_bar(dataset.len(), "reference log-probabilities (pairs)");
    for indices in all.chunks(micro.max(1)) {
        let batch = DpoBatch::new(&items_at(dataset, indices), pad);
        let logps = sequence_logps(model, &batch, chunk);
        out.extend((0..batch.pairs).map(|p| batch.pair(&logps, p)));
        if let Some(bar) = &bar {
            bar.inc(indices.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    out
}

/// The loss's view of a batch: each pair's policy and reference log-probabilities as the loss
/// uses them (sums, or averages for IPO).
pub fn used(section: &DpoSection, batch: &DpoBatch, logps: &[f64], pair: usize) -> [f64; 2] {
    let sums = batch.pair(logps, pair);
    let tokens = [batch.tokens[pair], batch.tokens[batch.pairs + pair]];
    [
        as_used(section.loss, sums[0], tokens[0]),
        as_used(section.loss, sums[1], tokens[1]),
    ]
}

/// Adds each pair of `batch` to `metrics`.
pub fn measure(
    section: &DpoSection,
    batch: &DpoBatch,
    policy: &[f64],
    reference: &[f64],
    metrics: &mut PairMetrics,
) {
    for p in 0..batch.pairs {
        let (pi, rho) = (
            used(section, batch, policy, p),
            used(section, batch, reference, p),
        );
        let loss = pair_loss(section.loss, section.beta, section.label_smoothing, pi, rho);
        metrics.add(section.beta, pi, rho, loss.loss);
    }
}

/// The derivative of the global batch's mean loss with respect to each row's summed
/// log-probability.
pub fn loss_weights(
    section: &DpoSection,
    batch: &DpoBatch,
    policy: &[f64],
    reference: &[f64],
    global_pairs: usize,
) -> Vec<f64> {
    let mut weights = vec![0.0; 2 * batch.pairs];
    for p in 0..batch.pairs {
        let (pi, rho) = (
            used(section, batch, policy, p),
            used(section, batch, reference, p),
        );
        let loss = pair_loss(section.loss, section.beta, section.label_smoothing, pi, rho);
        let rows = [p, batch.pairs + p];
        for (row, d) in rows.into_iter().zip([loss.d_chosen, loss.d_rejected]) {
            // IPO's averages: d/dsum = d/dmean / tokens.
            let per_sum = as_used(section.loss, d, batch.tokens[row]);
            weights[row] = per_sum / global_pairs.max(1) as f64;
        }
    }
    weights
}

fn evaluate(
    model: &Llama,
    dataset: &DpoDataset,
    reference: &Reference,
    section: &DpoSection,
    micro: usize,
    pad: u32,
    chunk: usize,
) -> PairMetrics {
    let mut metrics = PairMetrics::default();
    let all: Vec<usize> = (0..dataset.len()).collect();
    for indices in all.chunks(micro.max(1)) {
        let batch = DpoBatch::new(&items_at(dataset, indices), pad);
        let policy = sequence_logps(model, &batch, chunk);
        let reference = reference.logps(&batch, indices, true, chunk);
        measure(section, &batch, &policy, &reference, &mut metrics);
    }
    metrics
}

/// Runs DPO (or IPO, cDPO, robust DPO) as the recipe and its `[dpo]` section say.
pub fn run(recipe: &Recipe, section: &DpoSection, options: &RunOptions) -> Result<Summary> {
    let train = &recipe.train;
    let mut session = Session::open(recipe, options)?;
    let data = session.data()?;
    let pairs = |items: Vec<data::Item>| {
        let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
        dpo_dataset(&examples)
    };
    let train_set = pairs(data.train);
    let eval_set = pairs(data.eval);
    if train_set.is_empty() {
        return Err(TrainError::Invalid(
            "the training data holds no preference pairs (DPO needs `chosen` and `rejected` \
             answers: formats preference or hh-rlhf)"
                .into(),
        ));
    }
    session.check_one_batch(train_set.len(), "pairs")?;
    let (config, mut model) = session.model(Head::Lm)?;
    session.check_memory(&memory_plan(recipe, section, &config))?;
    let pad = config.pad_token_id.unwrap_or(0);
    let finished = Summary::finished(&session, train_set.len());
    if session.finished_before(train_set.len()) {
        return Ok(finished);
    }
    // Everything that can fail is read before the output directory changes: the saved
    // reference values of the run being resumed, else the reference model.
    let loaded = match &session.resume {
        Some(dir) if section.precompute_reference => {
            Reference::Precomputed(Precomputed::read(dir, &train_set, &eval_set)?)
        }
        _ => Reference::Model(Box::new(reference_model(
            &session, section, &model, &config,
        )?)),
    };
    let Some((mut run, mut optimizer)) = session.start(train_set.len())? else {
        return Ok(finished);
    };
    let micro = recipe.micro_batch_size();
    let chunk = train.loss_chunk;
    let reference = match loaded {
        Reference::Model(net) if section.precompute_reference => {
            eprintln!(
                "computing the reference's log-probabilities of {} training and {} evaluation \
                 pairs",
                train_set.len(),
                eval_set.len()
            );
            let saved = Precomputed {
                data: data_fingerprint(&train_set, &eval_set),
                train: precompute(&net, &train_set, micro, pad, chunk),
                eval: precompute(&net, &eval_set, micro, pad, chunk),
            };
            let out = &recipe.output.dir;
            saved.write(out)?;
            // The values as read back, which is what a resumed run gets: the same to the bit.
            Reference::Precomputed(Precomputed::read(out, &train_set, &eval_set)?)
        }
        other => other,
    };
    let total_steps = run.total;
    let mut batches = run.batches(lengths(&train_set));
    let plan = GradPlan::for_recipe(recipe);
    let mut last_eval = None;
    let mut last_loss = f64::NAN;
    let mut checkpoint = PathBuf::new();

    for step in run.start..total_steps {
        let (epoch, indices) = batches.batch(step);
        let items = items_at(&train_set, &indices);
        let global_pairs = items.len();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut metrics = PairMetrics::default();
        for (m, (chunk_items, chunk_indices)) in
            items.chunks(micro).zip(indices.chunks(micro)).enumerate()
        {
            let batch = DpoBatch::new(chunk_items, pad);
            let ref_logps = reference.logps(&batch, chunk_indices, false, chunk);
            let (policy, grads) = logps_and_grads(
                &model,
                &batch,
                plan.at(&[step as u64, m as u64]),
                |policy| loss_weights(section, &batch, policy, &ref_logps, global_pairs),
            );
            measure(section, &batch, &policy, &ref_logps, &mut metrics);
            accumulator.accumulate(&model, grads);
            let tokens = batch.sequences.tokens.iter().map(Vec::len).sum();
            run.count(tokens, batch.pairs);
        }
        let loss_value = metrics.loss();
        let stepped = run.optimizer_step(&mut optimizer, model, accumulator, step, loss_value)?;
        let named = metrics.values("");
        let mut values: Vec<(&str, f64)> = named
            .iter()
            .filter(|(k, _)| k != "loss")
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        values.push(("epoch", epoch as f64));
        run.log_step(step, loss_value, &stepped, &values, Some("pairs_per_sec"))?;
        model = stepped.model;
        last_loss = loss_value;
        let done = step + 1;
        if !eval_set.is_empty() && run.due(done, train.eval_every) {
            let eval = evaluate(
                &model.valid(),
                &eval_set,
                &reference,
                section,
                micro,
                pad,
                chunk,
            );
            let named = eval.values("eval_");
            let values: Vec<(&str, f64)> = named.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            run.log("eval", done, &values)?;
            last_eval = Some(eval);
        }
        if run.due(done, train.save_every) {
            checkpoint = run.save(
                done,
                &model,
                &config,
                &optimizer,
                |dir, _| match &reference {
                    Reference::Precomputed(saved) => saved.write(dir),
                    Reference::Model(_) => Ok(()),
                },
            )?;
        }
    }
    run.finish(&checkpoint);
    Ok(Summary {
        steps: total_steps,
        final_loss: last_loss,
        eval: last_eval,
        checkpoint,
    })
}
