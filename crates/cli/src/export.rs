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
    #[arg(long, required_unless_present = "meta", conflicts_with = "meta")]
    out: Option<PathBuf>,
    /// Write Meta's original layout to this directory instead (params.json,
    /// consolidated.NN.pth, tokenizer.model), for Meta's reference code
    #[arg(long)]
    meta: Option<PathBuf>,
    /// With --meta: the model-parallel size, i.e. the number of consolidated shards
    #[arg(long, default_value_t = 1, requires = "meta")]
    model_parallel: usize,
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
    let target = args
        .out
        .as_ref()
        .or(args.meta.as_ref())
        .context("--out or --meta")?;
    if let (Ok(from), Ok(to)) = (args.checkpoint.canonicalize(), target.canonicalize()) {
        if from == to {
            bail!(
                "{} is the checkpoint itself: export to another directory (replacing a \
                 training checkpoint would drop its optimizer state)",
                target.display()
            );
        }
    }
    if args.adapter {
        if args.meta.is_some() {
            bail!("--adapter writes a PEFT directory; Meta's layout holds merged models only");
        }
        return export_adapter(&args, target);
    }
    if let Some(meta) = &args.meta {
        return export_meta(&args, meta);
    }
    let (config, model, dtype) = load_with_dtype(&args, SaveDtype::F32)?;
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
    let extra_json = chat_format_files(&extra_files, &config)?;
    if !extra_json.is_empty() {
        // Ours replace the source's: they carry the chat template checked against our encoding.
        extra_files.retain(|file| {
            !extra_json
                .iter()
                .any(|(name, _)| file.file_name().is_some_and(|f| f == name.as_str()))
        });
    }
    let options = SaveOptions {
        dtype,
        max_shard_bytes,
        extra_files,
        extra_json,
        overwrite: args.overwrite,
    };
    llama::save_pretrained(&model, &config, target, &options)
        .with_context(|| format!("exporting to {}", target.display()))?;
    eprintln!(
        "wrote {} ({} parameters, {})",
        target.display(),
        config.parameter_count(),
        dtype.torch_name()
    );
    Ok(())
}

/// `tokenizer_config.json` and `special_tokens_map.json` with the Llama 2 chat template, for the
/// `tokenizer.json` among `files`, keeping the other settings of a `tokenizer_config.json` among
/// them. None without a `tokenizer.json`; none, with a warning, when it does not load or no
/// template gives our encoding with it (the source's files are then copied as they are).
pub fn chat_format_files(
    files: &[PathBuf],
    config: &llama::LlamaConfig,
) -> Result<Vec<(String, serde_json::Value)>> {
    let named = |name: &str| {
        files
            .iter()
            .find(|f| f.file_name().is_some_and(|n| n == name))
    };
    let Some(path) = named("tokenizer.json") else {
        return Ok(Vec::new());
    };
    let tokenizer = match data::Tokenizer::from_file(path) {
        Ok(tokenizer) => tokenizer,
        Err(e) => {
            eprintln!("warning: no chat template written: {e}");
            return Ok(Vec::new());
        }
    };
    let base = named("tokenizer_config.json")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| serde_json::from_str(&text).ok());
    chat_format_files_for(&tokenizer, config, base)
}

/// [`chat_format_files`] for a loaded tokenizer.
pub fn chat_format_files_for(
    tokenizer: &data::Tokenizer,
    config: &llama::LlamaConfig,
    base: Option<serde_json::Value>,
) -> Result<Vec<(String, serde_json::Value)>> {
    let files = data::chat::hf_tokenizer_configs(
        tokenizer,
        config.context_length(),
        config.pad_token_id,
        base,
    )?;
    match files {
        Some((tokenizer_config, special)) => Ok(vec![
            ("tokenizer_config.json".to_string(), tokenizer_config),
            ("special_tokens_map.json".to_string(), special),
        ]),
        None => {
            eprintln!(
                "warning: no chat template reproduces the Llama 2 chat encoding with {}; the \
                 export carries no chat template",
                tokenizer.path.display()
            );
            Ok(Vec::new())
        }
    }
}

/// `--adapter`: the checkpoint's adapters as a PEFT directory, with its tokenizer files.
fn export_adapter(args: &ExportArgs, out: &std::path::Path) -> Result<()> {
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
        out,
        args.base_name.as_deref(),
        &extra_files,
        args.overwrite,
    )
    .with_context(|| format!("exporting adapters to {}", out.display()))?;
    eprintln!("wrote {} (PEFT LoRA adapter)", out.display());
    Ok(())
}

/// `--meta DIR`: Meta's layout, for Meta's reference code; tokenizer.model comes from
/// --tokenizer or the checkpoint.
fn export_meta(args: &ExportArgs, out: &std::path::Path) -> Result<()> {
    // Meta's own files are bf16.
    let (config, model, dtype) = load_with_dtype(args, SaveDtype::BF16)?;
    // What Meta's layout cannot hold is refused before anything else is said.
    llama::meta::MetaParams::from_config(&config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.checkpoint.display()))?;
    let tokenizer = match &args.tokenizer {
        Some(file) if file.file_name().is_some_and(|n| n == "tokenizer.model") => {
            if !file.is_file() {
                bail!("{}: tokenizer file not found", file.display());
            }
            Some(file.clone())
        }
        Some(file) => bail!(
            "{}: Meta's layout takes a SentencePiece tokenizer.model",
            file.display()
        ),
        None => Some(args.checkpoint.join("tokenizer.model")).filter(|p| p.is_file()),
    };
    if tokenizer.is_none() {
        eprintln!(
            "warning: {} has no tokenizer.model; the export will have none (use --tokenizer)",
            args.checkpoint.display()
        );
    }
    if config.max_position_embeddings != llama::meta::LLAMA2_POSITIONS {
        eprintln!(
            "note: params.json does not record the context length ({}); give \
             `train convert --max-positions {}` when converting back",
            config.max_position_embeddings, config.max_position_embeddings
        );
    }
    llama::meta::export_meta(
        &model,
        &config,
        out,
        args.model_parallel,
        dtype,
        tokenizer.as_slice(),
        args.overwrite,
    )
    .with_context(|| format!("exporting to {} in Meta's layout", out.display()))?;
    eprintln!(
        "wrote {} (Meta layout, {} shard(s), {})",
        out.display(),
        args.model_parallel,
        dtype.torch_name()
    );
    Ok(())
}

/// The checkpoint on the CPU and the dtype to write: `--dtype`, else the source's, else
/// `fallback`.
fn load_with_dtype(
    args: &ExportArgs,
    fallback: SaveDtype,
) -> Result<(llama::LlamaConfig, llama::Llama, SaveDtype)> {
    let device = burn::prelude::Device::flex();
    let (config, model) = llama::load_pretrained(&args.checkpoint, &device)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let dtype = match &args.dtype {
        Some(name) => SaveDtype::parse(name)
            .with_context(|| format!("--dtype `{name}`: expected f32, bf16 or f16"))?,
        None => source_dtype(&args.checkpoint).unwrap_or(fallback),
    };
    Ok((config, model, dtype))
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
