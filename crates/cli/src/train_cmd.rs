use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct TrainArgs {
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

impl TrainArgs {
    fn load(&self) -> Result<(trainer::Recipe, trainer::RunOptions)> {
        let recipe = trainer::Recipe::load(&self.recipe, &self.set)?;
        let options = trainer::RunOptions {
            overwrite: self.overwrite,
            resume: self.resume.clone(),
        };
        Ok((recipe, options))
    }
}

pub fn run_sft(args: TrainArgs) -> Result<()> {
    let (recipe, options) = args.load()?;
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

pub fn run_reward(args: TrainArgs) -> Result<()> {
    let (recipe, options) = args.load()?;
    let summary = reward::train::run(&recipe, &options)
        .with_context(|| format!("train reward --recipe {}", args.recipe.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "steps": summary.steps,
            "final_loss": summary.final_loss,
            "eval": summary.eval,
            "checkpoint": summary.checkpoint,
        })
    );
    Ok(())
}

pub fn run_ppo(args: TrainArgs) -> Result<()> {
    let (recipe, options) = args.load()?;
    let summary = ppo::train::run(&recipe, &options)
        .with_context(|| format!("train ppo --recipe {}", args.recipe.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "iterations": summary.iterations,
            "first_reward_mean": summary.first_reward_mean,
            "final_reward_mean": summary.final_reward_mean,
            "final_kl": summary.final_kl,
            "checkpoint": summary.checkpoint,
        })
    );
    Ok(())
}

fn run_stage(
    args: TrainArgs,
    name: &str,
    run: fn(
        &trainer::Recipe,
        &trainer::RunOptions,
    ) -> trainer::run::Result<safety::rs::StageSummary>,
) -> Result<()> {
    let (recipe, options) = args.load()?;
    let summary = run(&recipe, &options)
        .with_context(|| format!("train {name} --recipe {}", args.recipe.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "prompts": summary.prompts,
            "kept": summary.kept,
            "records": summary.records,
            "steps": summary.sft.steps,
            "final_loss": summary.sft.final_loss,
            "checkpoint": summary.sft.checkpoint,
        })
    );
    Ok(())
}

pub fn run_rs(args: TrainArgs) -> Result<()> {
    run_stage(args, "rs", safety::rs::run)
}

pub fn run_distill(args: TrainArgs) -> Result<()> {
    run_stage(args, "distill", safety::distill::run)
}
