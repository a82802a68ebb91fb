use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use llama::{generate, init_random, load_config, parse_device, SamplingParams};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Generation tokens/s of a randomly initialised model, with and without the KV cache
    Generate(GenerateBench),
    /// Data pipeline throughput: read + validate + tokenize + batch
    Data(DataBench),
    /// Training throughput: tokens/s of full SFT steps on the recipe's model and batch shape
    Sft(RecipeBench),
    /// Reward models: pairs/s of training steps and of scoring, on the recipe's batch shape
    Reward(RecipeBench),
    /// PPO: time per iteration split into generation, scoring and update (random models)
    Ppo(RecipeBench),
}

#[derive(Args)]
pub struct RecipeBench {
    #[arg(long)]
    recipe: PathBuf,
    /// Override a recipe value (repeatable), e.g. --set runtime.device=tch:cpu
    #[arg(long)]
    set: Vec<String>,
    /// Timed steps (after one warm-up step)
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DataBench {
    /// Data files
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    format: Option<String>,
    #[arg(long, default_value_t = 4096)]
    max_seq_len: usize,
    /// Sequences per batch
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GenerateBench {
    /// Architecture file (configs/*.toml) or model directory
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Weights and compute in f32 or bf16
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Only measure with the KV cache
    #[arg(long)]
    cache_only: bool,
    /// Print one JSON object per mode
    #[arg(long)]
    json: bool,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Generate(args) => bench_generate(args),
        BenchCommand::Data(args) => bench_data(args),
        BenchCommand::Sft(args) => {
            let recipe = trainer::Recipe::load(&args.recipe, &args.set)?;
            let report = sft::train::bench(&recipe, args.steps.max(1))?;
            let rate = report.tokens_per_sec;
            let t = &recipe.train;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "device": recipe.runtime.device, "dtype": recipe.runtime.dtype,
                        "lora": recipe.lora.is_some(),
                        "activation_checkpointing": t.activation_checkpointing,
                        "batch_size": t.batch_size,
                        "micro_batch_size": recipe.micro_batch_size(),
                        "seq_len": recipe.data.max_seq_len, "steps": args.steps,
                        "tokens_per_sec": rate,
                        "parameters": report.config.parameter_count(),
                        "trained_parameters": report.trained_parameters,
                        "model_flops_per_token": report.flops_per_token,
                        "model_tflops_per_sec": report.flops_per_token * rate / 1e12,
                        "memory_plan": report.plan,
                        "peak_rss_bytes": peak_rss_bytes(),
                    })
                );
            } else {
                println!(
                    "{}: {:.0} tokens/s, {:.2} model TFLOP/s (batch {} x {} tokens, micro-batch \
                     {}; planned {})",
                    recipe.runtime.device,
                    rate,
                    report.flops_per_token * rate / 1e12,
                    t.batch_size,
                    recipe.data.max_seq_len,
                    recipe.micro_batch_size(),
                    trainer::memory::human_bytes(report.plan.total)
                );
            }
            Ok(())
        }
        BenchCommand::Ppo(args) => {
            let (recipe, settings) =
                trainer::Recipe::load_with::<ppo::PpoSection>(&args.recipe, &args.set)?;
            let settings = settings.context("the recipe has no [ppo] section")?;
            let reports = ppo::bench::bench(&recipe, &settings, args.steps.max(1))?;
            let mean = |f: &dyn Fn(&ppo::IterationReport) -> f64| {
                reports.iter().map(f).sum::<f64>() / reports.len() as f64
            };
            let generation = mean(&|r| r.generation_s);
            let scoring = mean(&|r| r.scoring_s);
            let update = mean(&|r| r.update_s);
            let rollout_rate = mean(&|r| r.get("rollout_tokens_per_sec").unwrap_or(0.0));
            // Cores kept busy: CPU seconds of all threads over wall-clock seconds.
            let busy = |cpu: f64, wall: f64| cpu / wall.max(1e-9);
            let generation_cores = busy(mean(&|r| r.generation_cpu_s), generation);
            let scoring_cores = busy(mean(&|r| r.scoring_cpu_s), scoring);
            let update_cores = busy(mean(&|r| r.update_cpu_s), update);
            let cores = busy(
                mean(&|r| r.generation_cpu_s + r.scoring_cpu_s + r.update_cpu_s),
                generation + scoring + update,
            );
            let prompts = recipe.train.batch_size;
            let new_tokens = settings.max_new_tokens;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "device": recipe.runtime.device, "prompts": prompts,
                        "prompt_len": recipe.data.max_seq_len, "new_tokens": new_tokens,
                        "iterations": reports.len(), "generation_s": generation,
                        "scoring_s": scoring, "update_s": update,
                        "iteration_s": generation + scoring + update,
                        "rollout_tokens_per_sec": rollout_rate,
                        "cores_busy": cores, "generation_cores_busy": generation_cores,
                        "scoring_cores_busy": scoring_cores, "update_cores_busy": update_cores,
                    })
                );
            } else {
                println!(
                    "{}: {:.1} s per iteration = generation {:.1} s ({:.0} tokens/s) + scoring \
                     {:.1} s + update {:.1} s ({} prompts of {} tokens, {} new tokens); cores \
                     busy {:.2} (generation {:.2}, scoring {:.2}, update {:.2})",
                    recipe.runtime.device,
                    generation + scoring + update,
                    generation,
                    rollout_rate,
                    scoring,
                    update,
                    prompts,
                    recipe.data.max_seq_len,
                    new_tokens,
                    cores,
                    generation_cores,
                    scoring_cores,
                    update_cores
                );
            }
            Ok(())
        }
        BenchCommand::Reward(args) => {
            let (recipe, _) =
                trainer::Recipe::load_with::<reward::RewardSection>(&args.recipe, &args.set)?;
            let (train, score) = reward::train::bench(&recipe, args.steps.max(1))?;
            let t = &recipe.train;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "device": recipe.runtime.device, "pairs": t.batch_size,
                        "micro_batch_size": recipe.micro_batch_size(),
                        "seq_len": recipe.data.max_seq_len, "steps": args.steps,
                        "train_pairs_per_sec": train, "score_pairs_per_sec": score,
                    })
                );
            } else {
                println!(
                    "{}: training {:.1} pairs/s, scoring {:.1} pairs/s ({} pairs x 2 x {} tokens, \
                     micro-batch {})",
                    recipe.runtime.device,
                    train,
                    score,
                    t.batch_size,
                    recipe.data.max_seq_len,
                    recipe.micro_batch_size()
                );
            }
            Ok(())
        }
    }
}

fn bench_generate(args: GenerateBench) -> Result<()> {
    let device = parse_device(&args.device)?;
    let config = load_config(&args.config)?;
    let model = init_random(&config, &device, 0).context("building the model")?;
    let model = match args.dtype.as_str() {
        "bf16" => llama::model::cast_weights(model, burn::tensor::FloatDType::BF16),
        _ => model,
    };
    // Deterministic prompt ids away from the special tokens.
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|b| {
            std::iter::once(1)
                .chain(
                    (0..args.prompt_len.saturating_sub(1))
                        .map(|i| (3 + (b * 7919 + i * 104_729) % (config.vocab_size - 3)) as u32),
                )
                .collect()
        })
        .collect();
    let modes: &[bool] = if args.cache_only {
        &[true]
    } else {
        &[true, false]
    };
    for &use_cache in modes {
        let params = SamplingParams {
            max_new_tokens: args.new_tokens,
            eos_token_id: None, // always generate every token
            use_cache,
            max_positions: config.context_length(),
            ..SamplingParams::default()
        };
        // Warm-up: the first calls allocate and tune.
        let warm = SamplingParams {
            max_new_tokens: 4,
            ..params.clone()
        };
        generate(&model, &prompts, &warm)?;
        let start = Instant::now();
        let out = generate(&model, &prompts, &params)?;
        let seconds = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|o| o.tokens.len()).sum();
        let rate = tokens as f64 / seconds;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "device": args.device, "dtype": args.dtype, "batch": args.batch,
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "use_cache": use_cache,
                    "tokens_per_sec": rate, "seconds": seconds,
                })
            );
        } else {
            println!(
                "{} batch {} prompt {} new {}: {:.1} tokens/s ({}, {:.2} s)",
                args.device,
                args.batch,
                args.prompt_len,
                args.new_tokens,
                rate,
                if use_cache { "KV cache" } else { "no cache" },
                seconds
            );
        }
    }
    Ok(())
}

/// Peak resident memory of this process, from /proc (Linux); None elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench_data(args: DataBench) -> Result<()> {
    use data::batch::{
        batch_order, lengths, pair_dataset, sequence_dataset, Dataset, PairBatch, SequenceBatch,
    };
    use data::{load_data, DataConfig, OnError, Tokenized, Tokenizer, Truncation};

    let tokenizer = Tokenizer::from_file(&args.tokenizer)?;
    let config = DataConfig::for_files(
        &args.files,
        args.format.as_deref(),
        args.max_seq_len,
        Truncation::TruncatePrompt,
        OnError::Stop,
    );
    let start = Instant::now();
    let loaded = load_data(&config, std::path::Path::new(""), &tokenizer, 0)?;
    let load_seconds = start.elapsed().as_secs_f64();
    let examples: Vec<Tokenized> = loaded.train.into_iter().map(|i| i.tokens).collect();
    let tokens: usize = examples.iter().map(Tokenized::token_count).sum();
    // Build the first batch the way a trainer would.
    let pairs = pair_dataset(&examples);
    let first_batch = if !pairs.is_empty() {
        let order = batch_order(&lengths(&pairs), args.batch_size, 0, 0, true);
        let items = pairs.get_many(order[0].clone())?;
        PairBatch::new(&items, 0).tokens.len()
    } else {
        let seqs = sequence_dataset(&examples, args.max_seq_len, false);
        let order = batch_order(&lengths(&seqs), args.batch_size, 0, 0, true);
        let items = match order.first() {
            Some(batch) => seqs.get_many(batch.clone())?,
            None => Vec::new(),
        };
        SequenceBatch::new(&items, 0).tokens.len()
    };
    let first_batch_seconds = start.elapsed().as_secs_f64();
    let result = serde_json::json!({
        "examples": examples.len(),
        "tokens": tokens,
        "seconds": load_seconds,
        "examples_per_sec": examples.len() as f64 / load_seconds,
        "tokens_per_sec": tokens as f64 / load_seconds,
        "first_batch_seconds": first_batch_seconds,
        "first_batch_rows": first_batch,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "{} examples, {} tokens in {:.2} s: {:.0} examples/s, {:.0} tokens/s; first batch after {:.2} s; peak memory {}",
            examples.len(),
            tokens,
            load_seconds,
            examples.len() as f64 / load_seconds,
            tokens as f64 / load_seconds,
            first_batch_seconds,
            peak_rss_bytes().map_or("unknown".into(), trainer::memory::human_bytes),
        );
    }
    Ok(())
}
