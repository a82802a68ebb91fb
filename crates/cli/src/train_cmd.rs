use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use trainer::{Recipe, RunOptions, Section};

#[derive(Args)]
pub struct TrainArgs {
    /// Recipe (TOML): [model], [data], [train], [runtime], [output], and the method's section
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
    /// The recipe with the method's section `S` (`None` when the recipe has none).
    fn load<S: Section>(&self) -> Result<(Recipe, Option<S>, RunOptions)> {
        let (recipe, section) = Recipe::load_with::<S>(&self.recipe, &self.set)?;
        let options = RunOptions {
            overwrite: self.overwrite,
            resume: self.resume.clone(),
        };
        Ok((recipe, section, options))
    }

    /// [`TrainArgs::load`] for a method that needs its section.
    fn load_required<S: Section>(&self) -> Result<(Recipe, S, RunOptions)> {
        let (recipe, section, options) = self.load::<S>()?;
        let section = section.with_context(|| {
            format!(
                "{}: the recipe has no [{}] section",
                self.recipe.display(),
                S::NAME
            )
        })?;
        Ok((recipe, section, options))
    }

    fn context(&self, command: &str) -> String {
        format!("train {command} --recipe {}", self.recipe.display())
    }
}

pub fn run_sft(args: TrainArgs) -> Result<()> {
    let (recipe, _, options) = args.load::<trainer::recipe::NoSection>()?;
    let summary = sft::train::run(&recipe, &options).with_context(|| args.context("sft"))?;
    println!(
        "{}",
        serde_json::json!({
            "steps": summary.steps,
            "final_loss": summary.final_loss,
            "eval_loss": summary.eval,
            "checkpoint": summary.checkpoint,
        })
    );
    Ok(())
}

pub fn run_reward(args: TrainArgs) -> Result<()> {
    let (recipe, section, options) = args.load::<reward::RewardSection>()?;
    let section = section.unwrap_or_default();
    let summary =
        reward::train::run(&recipe, &section, &options).with_context(|| args.context("reward"))?;
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

pub fn run_dpo(args: TrainArgs) -> Result<()> {
    let (recipe, section, options) = args.load::<dpo::DpoSection>()?;
    let section = section.unwrap_or_default();
    let summary =
        dpo::train::run(&recipe, &section, &options).with_context(|| args.context("dpo"))?;
    let eval = summary.eval.map(|e| {
        e.values("eval_")
            .into_iter()
            .map(|(k, v)| (k, serde_json::json!(v)))
            .collect::<serde_json::Map<String, serde_json::Value>>()
    });
    println!(
        "{}",
        serde_json::json!({
            "steps": summary.steps,
            "final_loss": summary.final_loss,
            "eval": eval,
            "checkpoint": summary.checkpoint,
        })
    );
    Ok(())
}

pub fn run_ppo(args: TrainArgs) -> Result<()> {
    let (recipe, section, options) = args.load_required::<ppo::PpoSection>()?;
    let summary =
        ppo::train::run(&recipe, &section, &options).with_context(|| args.context("ppo"))?;
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

fn print_stage(summary: &sampling::generate_then_sft::StageSummary) {
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
}

pub fn run_rs(args: TrainArgs) -> Result<()> {
    use sampling::rejection_sampling::{run, RsSection};
    let (recipe, section, options) = args.load_required::<RsSection>()?;
    let summary = run(&recipe, &section, &options).with_context(|| args.context("rs"))?;
    print_stage(&summary);
    Ok(())
}

pub fn run_distill(args: TrainArgs) -> Result<()> {
    use sampling::distill::{run, DistillSection};
    let (recipe, section, options) = args.load_required::<DistillSection>()?;
    let summary = run(&recipe, &section, &options).with_context(|| args.context("distill"))?;
    print_stage(&summary);
    Ok(())
}
