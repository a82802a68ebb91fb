use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use llama::{generate, init_random, load_config, parse_device, SamplingParams};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Generation tokens/s of a randomly initialised model, with and without the KV cache
    Generate(GenerateBench),
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
    }
}

fn bench_generate(args: GenerateBench) -> Result<()> {
    let device = parse_device(&args.device)?;
    let config = load_config(&args.config)?;
    let model = init_random(&config, &device, 0).context("building the model")?;
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
            max_positions: config.max_position_embeddings,
            ..SamplingParams::default()
        };
        // Warm-up: the first calls allocate and tune.
        let warm = SamplingParams {
            max_new_tokens: 4,
            ..params.clone()
        };
        generate(&model, &prompts, &warm);
        let start = Instant::now();
        let out = generate(&model, &prompts, &params);
        let seconds = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|o| o.tokens.len()).sum();
        let rate = tokens as f64 / seconds;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "device": args.device, "batch": args.batch, "prompt_len": args.prompt_len,
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
