use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct SftArgs {
    /// Recipe (TOML): [model], [data], [train], [runtime], [output]
    #[arg(long)]
    recipe: PathBuf,
    /// Override a recipe value, e.g. --set train.lr=1e-5 (repeatable)
    #[arg(long)]
    set: Vec<String>,
    /// Replace an output directory that holds another run
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Continue from a checkpoint directory, or `latest` in the run's output directory
    #[arg(long)]
    resume: Option<String>,
}

pub fn run(args: SftArgs) -> Result<()> {
    let recipe = trainer::Recipe::load(&args.recipe, &args.set)?;
    let options = sft::train::RunOptions {
        overwrite: args.overwrite,
        resume: args.resume,
    };
    let summary = sft::train::run(&recipe, &options)
        .with_context(|| format!("train sft --recipe {}", args.recipe.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "steps": summary.steps,
            "final_loss": summary.final_loss,
            "eval_loss": summary.eval_loss,
            "checkpoint": summary.checkpoint,
        })
    );
    Ok(())
}
