use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use trainer::memory::human_bytes;

#[derive(Args)]
pub struct InfoArgs {
    /// Architecture file (configs/*.toml), Hugging Face config.json, or model directory; with
    /// --recipe, the architecture of every model of the plan instead of the recipe's paths
    #[arg(long, required_unless_present = "recipe")]
    config: Option<PathBuf>,
    /// A training recipe: its run's memory plan (per device), by the command its section names
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Override a recipe value, e.g. --set train.micro_batch_size=1 (repeatable)
    #[arg(long, requires = "recipe")]
    set: Vec<String>,
    /// Print a JSON object instead of a table
    #[arg(long)]
    json: bool,
}

/// Bytes per parameter for full fine-tuning with AdamW, for each `runtime.dtype`: `bf16` keeps
/// weights, gradients and both moments in bf16; `bf16-mixed` keeps f32 master weights,
/// gradients and moments (and computes in bf16).
struct Footprint {
    name: &'static str,
    weights: u64,
    gradients: u64,
    adamw: u64,
}

const FOOTPRINTS: [Footprint; 3] = [
    Footprint {
        name: "f32",
        weights: 4,
        gradients: 4,
        adamw: 8,
    },
    Footprint {
        name: "bf16-mixed",
        weights: 4,
        gradients: 4,
        adamw: 8,
    },
    Footprint {
        name: "bf16",
        weights: 2,
        gradients: 2,
        adamw: 4,
    },
];

pub fn run(args: InfoArgs) -> Result<()> {
    let Some(config_path) = args.config.as_ref().filter(|_| args.recipe.is_none()) else {
        return recipe_plan(&args);
    };
    let config = llama::load_config(config_path)?;
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
            "config": config_path,
            "parameters": params,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "attention_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "context": config.context_length(),
            "full_finetune_memory_bytes": memory,
        });
        println!("{out}");
        return Ok(());
    }
    println!("{}", config_path.display());
    println!(
        "  {} layers, hidden {}, {} heads ({} KV), MLP {}, vocab {}, context {}, {} head",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
        config.context_length(),
        if config.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        },
    );
    println!("  parameters: {params} ({})", human_count(params));
    println!("  full fine-tuning memory with AdamW (activations not included):");
    println!(
        "    {:<10} {:>12} {:>12} {:>12} {:>12}",
        "dtype", "weights", "gradients", "AdamW", "total"
    );
    for f in &FOOTPRINTS {
        println!(
            "    {:<10} {:>12} {:>12} {:>12} {:>12}",
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

/// `train info --recipe`: the memory plan of the run the recipe describes, for the command its
/// method section names (`[reward]`, `[ppo]`; none, `[rs]` or `[distill]`: SFT).
fn recipe_plan(args: &InfoArgs) -> Result<()> {
    let path = args.recipe.as_ref().context("give --config or --recipe")?;
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let table: toml::Table = text.parse().unwrap_or_default();
    let given = args.config.as_deref().map(llama::load_config).transpose()?;
    let config_of = |path: &std::path::Path| -> Result<llama::LlamaConfig> {
        match &given {
            Some(config) => Ok(config.clone()),
            None => llama::load_config(path)
                .with_context(|| format!("{} (or give --config)", path.display())),
        }
    };
    let model_config = |recipe: &trainer::Recipe| -> Result<llama::LlamaConfig> {
        let source = recipe
            .model
            .checkpoint
            .as_ref()
            .or(recipe.model.config.as_ref())
            .context("[model] needs `config` or `checkpoint`")?;
        config_of(source)
    };
    let (command, recipe, plan) = if table.contains_key("ppo") {
        let (recipe, settings) = trainer::Recipe::load_with::<ppo::PpoSection>(path, &args.set)?;
        let settings = settings.context("the recipe has no [ppo] section")?;
        let policy = model_config(&recipe)?;
        let load = |p: &Option<PathBuf>| p.as_deref().map(config_of).transpose();
        let rms: Vec<_> = [
            load(&settings.reward_model)?,
            load(&settings.safety_reward_model)?,
        ]
        .into_iter()
        .flatten()
        .collect();
        let value = match (settings.has_value_model(), load(&settings.value_model)?) {
            (false, _) => None,
            (true, Some(value)) => Some(value),
            (true, None) => Some(rms.first().cloned().context("[ppo] needs a reward model")?),
        };
        let plan = ppo::train::memory_plan(&recipe, &settings, &policy, value.as_ref(), &rms);
        ("ppo", recipe, plan)
    } else if table.contains_key("dpo") {
        let (recipe, settings) = trainer::Recipe::load_with::<dpo::DpoSection>(path, &args.set)?;
        let settings = settings.unwrap_or_default();
        let plan = dpo::train::memory_plan(&recipe, &settings, &model_config(&recipe)?);
        ("dpo", recipe, plan)
    } else if table.contains_key("reward") {
        let (recipe, _) = trainer::Recipe::load_with::<reward::RewardSection>(path, &args.set)?;
        let plan = reward::train::memory_plan(&recipe, &model_config(&recipe)?);
        ("reward", recipe, plan)
    } else {
        let recipe = trainer::Recipe::load_any(path, &args.set)?;
        let plan = sft::train::memory_plan(&recipe, &model_config(&recipe)?);
        ("sft", recipe, plan)
    };
    let device = llama::parse_device(&recipe.runtime.device)?;
    let available = llama::memory_available(&recipe.runtime.device, &device);
    if args.json {
        let out = serde_json::json!({
            "recipe": path,
            "command": command,
            "device": recipe.runtime.device,
            "memory": plan,
            "available": available,
            "fits": available.map(|a| plan.total <= a),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "{} (train {command}, {})",
        path.display(),
        recipe.runtime.device
    );
    for (name, bytes) in [
        ("weights", plan.weights),
        ("gradients", plan.gradients),
        ("optimizer", plan.optimizer),
        ("activations", plan.activations),
        ("logits", plan.logits),
        ("total", plan.total),
    ] {
        println!("  {name:<12} {:>12}", human_bytes(bytes));
    }
    match available {
        Some(a) => println!("  available    {:>12}", human_bytes(a)),
        None => println!("  available    not known for this device"),
    }
    Ok(())
}
