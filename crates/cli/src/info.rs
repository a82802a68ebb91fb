use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct InfoArgs {
    /// Architecture file (configs/*.toml), Hugging Face config.json, or model directory
    #[arg(long)]
    config: PathBuf,
    /// Print a JSON object instead of a table
    #[arg(long)]
    json: bool,
}

/// Bytes per parameter for full fine-tuning with AdamW. bf16 training keeps the two AdamW
/// moments in f32, as mixed-precision trainers do.
struct Footprint {
    name: &'static str,
    weights: u64,
    gradients: u64,
    adamw: u64,
}

const FOOTPRINTS: [Footprint; 2] = [
    Footprint {
        name: "f32",
        weights: 4,
        gradients: 4,
        adamw: 8,
    },
    Footprint {
        name: "bf16",
        weights: 2,
        gradients: 2,
        adamw: 8,
    },
];

pub fn run(args: InfoArgs) -> Result<()> {
    let config = llama::load_config(&args.config)?;
    let params = config.parameter_count();
    if args.json {
        let mut memory = serde_json::Map::new();
        for f in &FOOTPRINTS {
            memory.insert(
                f.name.into(),
                serde_json::json!({
                    "weights": params * f.weights,
                    "gradients": params * f.gradients,
                    "adamw_state": params * f.adamw,
                    "total": params * (f.weights + f.gradients + f.adamw),
                }),
            );
        }
        let out = serde_json::json!({
            "config": args.config,
            "parameters": params,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "attention_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "context": config.max_position_embeddings,
            "full_finetune_memory_bytes": memory,
        });
        println!("{out}");
        return Ok(());
    }
    println!("{}", args.config.display());
    println!(
        "  {} layers, hidden {}, {} heads ({} KV), MLP {}, vocab {}, context {}, {} head",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
        config.max_position_embeddings,
        if config.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        },
    );
    println!("  parameters: {params} ({})", human_count(params));
    println!("  full fine-tuning memory with AdamW (activations not included):");
    println!(
        "    {:<6} {:>12} {:>12} {:>12} {:>12}",
        "dtype", "weights", "gradients", "AdamW", "total"
    );
    for f in &FOOTPRINTS {
        println!(
            "    {:<6} {:>12} {:>12} {:>12} {:>12}",
            f.name,
            human_bytes(params * f.weights),
            human_bytes(params * f.gradients),
            human_bytes(params * f.adamw),
            human_bytes(params * (f.weights + f.gradients + f.adamw)),
        );
    }
    Ok(())
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => format!("{:.1} K", n as f64 / 1e3),
    }
}

pub fn human_bytes(n: u64) -> String {
    let gib = n as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}
