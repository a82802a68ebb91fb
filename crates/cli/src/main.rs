//! `train`: the command-line entry point. Each subcommand is a thin layer over the library
//! crates; errors are reported on one line with their context.

mod allocator;
mod bench;
mod convert;
mod data_cmd;
mod eval_cmd;
mod export;
mod generate;
mod info;
mod score;
mod train_cmd;
mod verify;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Fine-tune Llama 2 models: SFT, reward models and RLHF with PPO"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Supervised fine-tuning from a recipe
    Sft(train_cmd::TrainArgs),
    /// Train a reward model on preference pairs from a recipe
    Reward(train_cmd::TrainArgs),
    /// Direct preference optimisation (DPO, IPO, cDPO, robust DPO) on preference pairs
    Dpo(train_cmd::TrainArgs),
    /// RLHF with PPO against one or two reward models, from a recipe
    Ppo(train_cmd::TrainArgs),
    /// Rejection sampling fine-tuning: best of K answers by a reward model, then SFT
    Rs(train_cmd::TrainArgs),
    /// Targeted context distillation of a safety pre-prompt, then SFT
    Distill(train_cmd::TrainArgs),
    /// Evaluate a model: safety (refusals, false refusals, safety reward)
    #[command(subcommand)]
    Eval(eval_cmd::EvalCommand),
    /// Score preference pairs (accuracy) or {prompt, response} records with a reward model
    Score(score::ScoreArgs),
    /// Parameter count and full fine-tuning memory of an architecture, without building it
    Info(info::InfoArgs),
    /// Generate text from a model directory (KV-cached, batched)
    Generate(generate::GenerateArgs),
    /// Write a checkpoint as a Hugging Face model directory (or in Meta's layout)
    Export(export::ExportArgs),
    /// Convert Meta's original Llama 2 download to a Hugging Face model directory
    Convert(convert::ConvertArgs),
    /// Inspect training data: counts, token lengths, rendered examples
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Check a model on a device against reference outputs from `transformers`
    Verify(verify::VerifyArgs),
    /// Benchmarks (not tests): generation, data, SFT and reward-model throughput
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sft(args) => train_cmd::run_sft(args),
        Command::Reward(args) => train_cmd::run_reward(args),
        Command::Dpo(args) => train_cmd::run_dpo(args),
        Command::Ppo(args) => train_cmd::run_ppo(args),
        Command::Rs(args) => train_cmd::run_rs(args),
        Command::Distill(args) => train_cmd::run_distill(args),
        Command::Eval(command) => eval_cmd::run(command),
        Command::Score(args) => score::run(args),
        Command::Info(args) => info::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Data(command) => data_cmd::run(command),
        Command::Verify(args) => verify::run(args),
        Command::Bench(command) => bench::run(command),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
