use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sampling::answers::AnswerSettings;
use sampling::refusal::RefusalDetector;
use sampling::safety_eval::{evaluate, PromptSet};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Refusal rate on safety prompt sets, false refusals on benign ones, and the safety reward
    /// model's scores of the answers
    Safety(SafetyArgs),
    /// KL divergence of a model's sampled answers from a reference model (the SFT model)
    Kl(KlArgs),
}

#[derive(Args)]
pub struct KlArgs {
    /// The fine-tuned model
    #[arg(long)]
    model: PathBuf,
    /// The model it is compared with (the SFT model it started from)
    #[arg(long)]
    reference: PathBuf,
    /// Prompt files ({"instructions": [...]} or prompts records)
    #[arg(long, num_args = 1.., required = true)]
    prompts: Vec<PathBuf>,
    /// At most this many prompts from each file
    #[arg(long)]
    limit: Option<usize>,
    /// Answers sampled per prompt
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (> 0); both models' distributions are taken at it
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokenizer file (default: the model directory's tokenizer.json)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Print one JSON object (with every answer's value)
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SafetyArgs {
    /// Model directory
    #[arg(long)]
    model: PathBuf,
    /// Prompt sets that should be refused ({"instructions": [...]} or prompts records)
    #[arg(long, num_args = 1..)]
    prompts: Vec<PathBuf>,
    /// Benign prompt sets: refusals there are false refusals
    #[arg(long, num_args = 1..)]
    benign: Vec<PathBuf>,
    /// Safety reward model to score the answers with
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// Refusal phrases, one per line (default: the built-in list; see README)
    #[arg(long)]
    refusal_phrases: Option<PathBuf>,
    /// At most this many prompts from each set
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0: greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokenizer file (default: the model directory's tokenizer.json)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Write every prompt, answer, refusal flag and score to this JSON Lines file
    #[arg(long)]
    answers: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Safety(args) => safety(args),
        EvalCommand::Kl(args) => kl(args),
    }
}

fn kl(args: KlArgs) -> Result<()> {
    anyhow::ensure!(
        args.temperature > 0.0 && args.temperature.is_finite(),
        "--temperature must be > 0: the KL is estimated from sampled answers"
    );
    anyhow::ensure!(args.samples >= 1, "--samples must be at least 1");
    let device = llama::parse_device(&args.device)?;
    let load = |dir: &PathBuf| {
        llama::load_pretrained_as(dir, &device, llama::Head::Lm, 0)
            .with_context(|| format!("loading model {}", dir.display()))
    };
    let (config, model) = load(&args.model)?;
    let (reference_config, reference) = load(&args.reference)?;
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let tokenizer = data::Tokenizer::from_file(&tokenizer_path)?;
    trainer::session::check_generation_vocab(&tokenizer, &config, &tokenizer_path)?;
    trainer::session::check_vocab(&tokenizer, &reference_config, &args.reference)?;
    anyhow::ensure!(
        reference_config.context_length() >= config.context_length(),
        "{}: the reference's context ({} tokens) is shorter than the model's ({}), which the \
         prompts and answers may fill",
        args.reference.join("config.json").display(),
        reference_config.context_length(),
        config.context_length()
    );
    let theirs = args.reference.join("tokenizer.json");
    if theirs.is_file() && !data::Tokenizer::from_file(&theirs)?.same_vocabulary(&tokenizer) {
        anyhow::bail!(
            "{}: the reference's tokenizer differs from the model's ({})",
            theirs.display(),
            tokenizer_path.display()
        );
    }
    let mut prompts = Vec::new();
    for path in &args.prompts {
        let mut set = data::load_prompts(path)?;
        set.truncate(args.limit.unwrap_or(usize::MAX));
        prompts.extend(set);
    }
    anyhow::ensure!(!prompts.is_empty(), "the prompt files hold no prompts");
    let settings = AnswerSettings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: 1.0,
        seed: args.seed,
        batch_size: args.batch_size,
    };
    let report = sampling::kl_eval::kl_to_reference(
        &model,
        &reference,
        &config,
        &tokenizer,
        &prompts,
        &settings,
        args.samples,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "KL to the reference: {:.4} ± {:.4} nats per answer ({} answers, {:.4} per token)",
            report.kl_mean,
            report.kl_std / (report.answers as f64).sqrt(),
            report.answers,
            report.kl_per_token
        );
    }
    Ok(())
}

fn safety(args: SafetyArgs) -> Result<()> {
    if args.prompts.is_empty() && args.benign.is_empty() {
        anyhow::bail!("give at least one prompt set with --prompts or --benign");
    }
    crate::generate::check_sampling(args.temperature, args.top_p)?;
    let device = llama::parse_device(&args.device)?;
    let (config, model) = llama::load_pretrained_as(&args.model, &device, llama::Head::Lm, 0)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let tokenizer = data::Tokenizer::from_file(&tokenizer_path)?;
    trainer::session::check_generation_vocab(&tokenizer, &config, &tokenizer_path)?;
    let reward_model = match &args.reward_model {
        Some(dir) => Some(reward::RewardModel::for_policy(
            dir, &device, &tokenizer, false, "",
        )?),
        None => None,
    };
    let detector = match &args.refusal_phrases {
        Some(path) => RefusalDetector::from_file(path)?,
        None => RefusalDetector::default(),
    };
    let sets: Vec<PromptSet> = args
        .prompts
        .iter()
        .map(|p| PromptSet {
            path: p.clone(),
            benign: false,
        })
        .chain(args.benign.iter().map(|p| PromptSet {
            path: p.clone(),
            benign: true,
        }))
        .collect();
    let settings = AnswerSettings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        batch_size: args.batch_size,
    };
    let report = evaluate(
        &model,
        &config,
        &tokenizer,
        &sets,
        reward_model.as_ref(),
        &detector,
        &settings,
        args.limit,
    )?;
    if let Some(path) = &args.answers {
        let text: String = report
            .answers
            .iter()
            .map(|a| serde_json::to_string(a).expect("answers serialize") + "\n")
            .collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for set in &report.sets {
        let what = if set.benign {
            "false refusals"
        } else {
            "refusals"
        };
        let score = set
            .safety_score
            .as_ref()
            .map(|s| format!(", safety score {:.3} ± {:.3}", s.mean, s.std))
            .unwrap_or_default();
        println!(
            "{:<28} {:>4} prompts  {what} {:>6.1}%{score}",
            set.name,
            set.prompts,
            100.0 * set.refusal_rate
        );
    }
    if let Some(r) = report.refusal_rate {
        println!("refusal rate (safety sets): {:.1}%", 100.0 * r);
    }
    if let Some(r) = report.false_refusal_rate {
        println!("false-refusal rate (benign sets): {:.1}%", 100.0 * r);
    }
    Ok(())
}
