use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use reward::score::{score_file, ScoreReport};
use reward::RewardModel;

#[derive(Args)]
pub struct ScoreArgs {
    /// Reward model directory (a `train reward` checkpoint or a Hugging Face
    /// LlamaForSequenceClassification)
    #[arg(long)]
    model: PathBuf,
    /// Preference pairs (preference or hh-rlhf format) or {prompt, response} records
    #[arg(long)]
    data: PathBuf,
    /// Tokenizer file (default: the model directory's tokenizer.json)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Sequences longer than this lose prompt tokens from the left (default: the model's
    /// context length)
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Pairs or records per forward pass
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Print one JSON object: {accuracy, per_bucket, ...} for pairs, {scores} for records
    #[arg(long)]
    json: bool,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let device = llama::parse_device(&args.device)?;
    let rm = RewardModel::load(&args.model, &device)?;
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let tokenizer = data::Tokenizer::from_file(&tokenizer_path)?;
    let max_seq_len = args.max_seq_len.unwrap_or(rm.config.context_length());
    let report = score_file(&rm, &tokenizer, &args.data, args.batch_size, max_seq_len)
        .with_context(|| format!("scoring {}", args.data.display()))?;
    match report {
        ScoreReport::Pairs(eval) => {
            if args.json {
                println!("{}", serde_json::to_string(&eval)?);
            } else {
                println!(
                    "{} pairs: accuracy {:.4}, mean margin {:.4}, scores {:.4} ± {:.4}",
                    eval.pairs, eval.accuracy, eval.mean_margin, eval.reward_mean, eval.reward_std
                );
                for (bucket, b) in &eval.per_bucket {
                    println!("  {bucket}: accuracy {:.4} ({} pairs)", b.accuracy, b.pairs);
                }
            }
        }
        ScoreReport::Records(scores) => {
            if args.json {
                println!("{}", serde_json::json!({ "scores": scores }));
            } else {
                for score in scores {
                    println!("{score:.6}");
                }
            }
        }
    }
    Ok(())
}
