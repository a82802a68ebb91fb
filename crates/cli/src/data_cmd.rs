use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use data::inspect::{render_item, summarize, Marking};
use data::{load_data, DataConfig, OnError, Tokenizer, Truncation};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Counts, token lengths and rendered examples of a recipe's data or of files
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// Data files (JSON Lines or JSON arrays, optionally gzip-compressed)
    files: Vec<PathBuf>,
    /// A recipe: its [data] section, [model] tokenizer and [train] seed
    #[arg(long, conflicts_with = "files")]
    recipe: Option<PathBuf>,
    /// Override a recipe value, e.g. --set data.max_seq_len=512 (repeatable)
    #[arg(long, requires = "recipe")]
    set: Vec<String>,
    /// Format of the files (alpaca, messages, hh-rlhf, preference, prompts, text); detected
    /// from the records when absent
    #[arg(long)]
    format: Option<String>,
    /// tokenizer.json (required with files)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// truncate_prompt, truncate_answer or drop
    #[arg(long, default_value = "truncate_prompt")]
    truncation: String,
    /// Skip and count malformed records instead of stopping at the first
    #[arg(long)]
    skip_errors: bool,
    /// Examples to show
    #[arg(long, default_value_t = 3)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the counts as one JSON object
    #[arg(long)]
    json: bool,
    /// Also write every example's token ids and trained mask to this file (JSON Lines, train
    /// split first): exactly what a trainer sees, for reference computations elsewhere
    #[arg(long)]
    ids: Option<PathBuf>,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Inspect(args) => inspect(args),
    }
}

/// The parts of a recipe the data pipeline reads.
struct DataRecipe {
    data: DataConfig,
    base: PathBuf,
    tokenizer: PathBuf,
    seed: u64,
}

fn inspect(args: InspectArgs) -> Result<()> {
    let recipe = match &args.recipe {
        Some(path) => {
            let recipe = trainer::Recipe::load_any(path, &args.set)?;
            DataRecipe {
                data: recipe.data,
                base: PathBuf::new(),
                tokenizer: recipe.model.tokenizer,
                seed: recipe.train.seed,
            }
        }
        None => {
            if args.files.is_empty() {
                bail!("give data files or --recipe");
            }
            let tokenizer = args
                .tokenizer
                .clone()
                .context("--tokenizer is required when inspecting files")?;
            let truncation: Truncation = serde_json::from_value(serde_json::json!(args.truncation))
                .with_context(|| {
                    format!(
                        "--truncation `{}`: expected truncate_prompt, truncate_answer or drop",
                        args.truncation
                    )
                })?;
            let on_error = if args.skip_errors {
                OnError::Skip
            } else {
                OnError::Stop
            };
            let data = DataConfig::for_files(
                &args.files,
                args.format.as_deref(),
                args.max_seq_len,
                truncation,
                on_error,
            );
            DataRecipe {
                data,
                base: PathBuf::new(),
                tokenizer,
                seed: args.seed,
            }
        }
    };
    let tokenizer = Tokenizer::from_file(&recipe.tokenizer)?;
    let loaded = load_data(&recipe.data, &recipe.base, &tokenizer, recipe.seed)?;
    let summary = summarize(&loaded);
    if let Some(path) = &args.ids {
        write_ids(&loaded, path).with_context(|| format!("{}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    for s in &summary.sources {
        println!(
            "{} [{}{}]: read {}, valid {}, selected {}, truncated {}, dropped {}, errors {}",
            s.path.display(),
            s.format,
            if s.detected { ", detected" } else { "" },
            s.read,
            s.valid,
            s.selected,
            s.truncated,
            s.dropped,
            s.errors
        );
        for message in &s.error_samples {
            println!("  skipped: {message}");
        }
    }
    println!(
        "examples: {} (train {}, eval {}); errors {}; truncated {}; dropped {}",
        summary.examples,
        summary.train,
        summary.eval,
        summary.errors,
        summary.truncated,
        summary.dropped
    );
    let t = &summary.tokens;
    println!(
        "tokens per example: min {} p50 {} p90 {} p99 {} max {}; {} tokens, {} trained ({:.1}%)",
        t.min,
        t.p50,
        t.p90,
        t.p99,
        t.max,
        summary.total_tokens,
        summary.trained_tokens,
        100.0 * summary.trained_tokens as f64 / summary.total_tokens.max(1) as f64
    );
    let marking = if std::io::stdout().is_terminal() {
        println!("(trained tokens in green, masked tokens dimmed)");
        Marking::Color
    } else {
        println!("(trained tokens inside [[ ]])");
        Marking::Brackets
    };
    for item in loaded.train.iter().take(args.n) {
        let source = &loaded.sources[item.source].path;
        println!("\n--- {}:{}", source.display(), item.line);
        println!("{}", render_item(&tokenizer, &item.tokens, marking)?);
    }
    Ok(())
}

/// One JSON line per example: its split, kind and token ids, with the trained mask of sequences
/// and of both answers of a pair.
fn write_ids(data: &data::LoadedData, path: &std::path::Path) -> Result<()> {
    use data::Tokenized;
    use std::io::Write;
    let rendered =
        |r: &data::chat::Rendered| serde_json::json!({"ids": r.ids, "trained": r.trained});
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let splits = [("train", &data.train), ("eval", &data.eval)];
    for (split, items) in splits {
        for item in items.iter() {
            let record = match &item.tokens {
                Tokenized::Sequence(r) => {
                    serde_json::json!({"split": split, "kind": "sequence", "sequence": rendered(r)})
                }
                Tokenized::Pair {
                    chosen,
                    rejected,
                    prompt_len,
                    ..
                } => serde_json::json!({
                    "split": split,
                    "kind": "pair",
                    "prompt_len": prompt_len,
                    "chosen": rendered(chosen),
                    "rejected": rendered(rejected),
                }),
                Tokenized::Prompt { ids, category } => serde_json::json!({
                    "split": split,
                    "kind": "prompt",
                    "ids": ids,
                    "category": category,
                }),
            };
            writeln!(out, "{record}")?;
        }
    }
    out.flush()?;
    Ok(())
}
