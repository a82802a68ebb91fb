//! `train convert --meta DIR --out DIR`: Meta's original Llama 2 download to a Hugging Face
//! directory (weights in their own dtype, config, tokenizer.json built from tokenizer.model,
//! the chat template).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use llama::meta::{convert_meta, ConvertOptions, MetaCheckpoint, LLAMA2_POSITIONS};

use crate::export::{chat_format_files_for, parse_size};

#[derive(Args)]
pub struct ConvertArgs {
    /// Meta checkpoint directory: params.json and consolidated.NN.pth
    #[arg(long)]
    meta: PathBuf,
    /// Output directory (Hugging Face layout); written atomically
    #[arg(long)]
    out: PathBuf,
    /// SentencePiece tokenizer.model (default: in --meta, else beside it, as Meta's download
    /// places it)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Context length to record (params.json does not hold it; Llama 2: 4096)
    #[arg(long, default_value_t = LLAMA2_POSITIONS)]
    max_positions: usize,
    /// Largest safetensors shard, e.g. 5GB, 500MB
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Replace the output directory if it exists
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let checkpoint = MetaCheckpoint::open(&args.meta, args.max_positions)
        .with_context(|| format!("reading Meta checkpoint {}", args.meta.display()))?;
    let tokenizer_model = match &args.tokenizer {
        Some(path) if !path.is_file() => bail!("{}: tokenizer file not found", path.display()),
        Some(path) => Some(path.clone()),
        None => find_tokenizer_model(&args.meta),
    };
    let mut options = ConvertOptions {
        max_shard_bytes: parse_size(&args.max_shard_size)?,
        overwrite: args.overwrite,
        extra_files: Vec::new(),
        extra_json: Vec::new(),
    };
    match &tokenizer_model {
        Some(path) => {
            let model = data::sentencepiece::SentencePieceModel::from_file(path)?;
            let json = model
                .to_tokenizer_json()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            if model.pieces.len() != checkpoint.config.vocab_size {
                bail!(
                    "{}: {} pieces, but the checkpoint's embedding has {} rows",
                    path.display(),
                    model.pieces.len(),
                    checkpoint.config.vocab_size
                );
            }
            // The chat template is checked against the tokenizer just built.
            let built = data::Tokenizer::from_json(&serde_json::to_string(&json)?, path)?;
            let chat = chat_format_files_for(&built, &checkpoint.config, None)?;
            options.extra_files.push(path.clone());
            options.extra_json.push(("tokenizer.json".into(), json));
            options.extra_json.extend(chat);
        }
        None => eprintln!(
            "warning: no tokenizer.model in or beside {}; the output has no tokenizer (use \
             --tokenizer)",
            args.meta.display()
        ),
    }
    eprintln!(
        "converting {} ({} model-parallel shard(s), {}, {} parameters)",
        args.meta.display(),
        checkpoint.model_parallel(),
        checkpoint.dtype.torch_name(),
        checkpoint.config.parameter_count()
    );
    convert_meta(&checkpoint, &args.out, &options)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn find_tokenizer_model(dir: &Path) -> Option<PathBuf> {
    [Some(dir.to_path_buf()), dir.parent().map(Path::to_path_buf)]
        .into_iter()
        .flatten()
        .map(|d| d.join("tokenizer.model"))
        .find(|p| p.is_file())
}
