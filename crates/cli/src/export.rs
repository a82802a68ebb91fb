use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use llama::checkpoint::TOKENIZER_FILES;
use llama::{SaveDtype, SaveOptions};

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory (ours or Hugging Face)
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory; written atomically
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype: f32, bf16 or f16 (default: the checkpoint's torch_dtype, else f32)
    #[arg(long)]
    dtype: Option<String>,
    /// Largest safetensors shard, e.g. 5GB, 500MB
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Tokenizer file to include (default: the checkpoint's tokenizer files)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Replace the output directory if it exists
    #[arg(long)]
    overwrite: bool,
    /// For a LoRA checkpoint: write the PEFT adapter directory (adapter_config.json,
    /// adapter_model.safetensors) instead of the merged model
    #[arg(long)]
    adapter: bool,
    /// With --adapter: the `base_model_name_or_path` to record (e.g. a Hub id); default: the
    /// base directory the run trained on
    #[arg(long, requires = "adapter")]
    base_name: Option<String>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    if let (Ok(from), Ok(to)) = (args.checkpoint.canonicalize(), args.out.canonicalize()) {
        if from == to {
            bail!(
                "--out {} is the checkpoint itself: export to another directory (replacing a \
                 training checkpoint would drop its optimizer state)",
                args.out.display()
            );
        }
    }
    if args.adapter {
        return export_adapter(&args);
    }
    let device = burn::prelude::Device::flex();
    let (config, model) = llama::load_pretrained(&args.checkpoint, &device)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let dtype = match &args.dtype {
        Some(name) => SaveDtype::parse(name)
            .with_context(|| format!("--dtype `{name}`: expected f32, bf16 or f16"))?,
        None => source_dtype(&args.checkpoint).unwrap_or(SaveDtype::F32),
    };
    let max_shard_bytes = parse_size(&args.max_shard_size)?;
    let mut extra_files = match &args.tokenizer {
        Some(file) => {
            if !file.exists() {
                bail!("{}: tokenizer file not found", file.display());
            }
            vec![file.clone()]
        }
        None => TOKENIZER_FILES
            .iter()
            .map(|name| args.checkpoint.join(name))
            .filter(|p| p.exists())
            .collect(),
    };
    // A reward model's score statistics travel with it (PPO normalises with them).
    let stats = args.checkpoint.join("reward_stats.json");
    let has_tokenizer = !extra_files.is_empty();
    if stats.exists() {
        extra_files.push(stats);
    }
    if !has_tokenizer {
        eprintln!(
            "warning: {} has no tokenizer files; the export will have none (use --tokenizer)",
            args.checkpoint.display()
        );
    }
    let options = SaveOptions {
        dtype,
        max_shard_bytes,
        extra_files,
        overwrite: args.overwrite,
    };
    llama::save_pretrained(&model, &config, &args.out, &options)
        .with_context(|| format!("exporting to {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} parameters, {})",
        args.out.display(),
        config.parameter_count(),
        dtype.torch_name()
    );
    Ok(())
}

/// `--adapter`: the checkpoint's adapters as a PEFT directory, with its tokenizer files.
fn export_adapter(args: &ExportArgs) -> Result<()> {
    if args.dtype.is_some() {
        bail!("--dtype applies to merged exports; adapters are written as f32 (drop --dtype)");
    }
    let extra_files: Vec<PathBuf> = match &args.tokenizer {
        Some(file) if !file.exists() => bail!("{}: tokenizer file not found", file.display()),
        Some(file) => vec![file.clone()],
        None => TOKENIZER_FILES
            .iter()
            .map(|name| args.checkpoint.join(name))
            .filter(|p| p.exists())
            .collect(),
    };
    llama::checkpoint::export_adapter(
        &args.checkpoint,
        &args.out,
        args.base_name.as_deref(),
        &extra_files,
        args.overwrite,
    )
    .with_context(|| format!("exporting adapters to {}", args.out.display()))?;
    eprintln!("wrote {} (PEFT LoRA adapter)", args.out.display());
    Ok(())
}

fn source_dtype(dir: &std::path::Path) -> Option<SaveDtype> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let name = value
        .get("torch_dtype")
        .or_else(|| value.get("dtype"))?
        .as_str()?;
    SaveDtype::parse(name)
}

/// "5GB", "500MB", "2GiB", or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("size `{text}`: expected a number with an optional unit"))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("size `{text}`: unknown unit `{other}`"),
    };
    let bytes = value * scale;
    if bytes < 1.0 {
        bail!("size `{text}` must be positive");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 * 1024 * 1024 * 1024);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("GB").is_err());
    }
}
