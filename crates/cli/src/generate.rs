use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use data::Tokenizer;
use llama::{generate, parse_device, SamplingParams};

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face format: config.json, *.safetensors, tokenizer.json)
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; repeat to generate for several prompts in one batch
    #[arg(long, required = true)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the Llama 2 chat format
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat)
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokenizer file (default: MODEL/tokenizer.json)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// flex | cuda:N | tch:cpu | tch:cuda:N
    #[arg(long, default_value = "flex")]
    device: String,
    /// Recompute the whole sequence at every step (slow; for comparison)
    #[arg(long)]
    no_cache: bool,
    /// Print one JSON object per prompt: prompt_tokens, tokens, text
    #[arg(long)]
    json: bool,
}

/// Refuses sampling settings that would not sample: a negative or NaN temperature, a top-p
/// outside (0, 1].
pub fn check_sampling(temperature: f64, top_p: f64) -> Result<()> {
    if temperature.is_nan() || temperature < 0.0 {
        bail!("--temperature must be >= 0");
    }
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        bail!("--top-p must be in (0, 1]");
    }
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_sampling(args.temperature.into(), args.top_p.into())?;
    let device = parse_device(&args.device)?;
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let (config, model) = llama::load_pretrained_as(&args.model, &device, llama::Head::Lm, 0)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    trainer::session::check_generation_vocab(&tokenizer, &config, &tokenizer_path)?;
    // A blank system prompt means none, not an empty <<SYS>> block.
    let system = args.system.as_deref().filter(|s| !s.trim().is_empty());

    let mut prompts = Vec::with_capacity(args.prompt.len());
    for (i, text) in args.prompt.iter().enumerate() {
        if text.trim().is_empty() {
            bail!("prompt {} is empty", i + 1);
        }
        let ids = if args.chat {
            data::render_prompt(&tokenizer, system, text)?
        } else {
            tokenizer.encode_with_bos(text)?
        };
        if ids.len() >= config.context_length() {
            bail!(
                "prompt {} has {} tokens; the model's context is {} tokens",
                i + 1,
                ids.len(),
                config.context_length()
            );
        }
        prompts.push(ids);
    }

    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_id: Some(tokenizer.eos_id),
        pad_token_id: config.pad_token_id.unwrap_or(0),
        use_cache: !args.no_cache,
        max_positions: config.context_length(),
        vocab_limit: Some(tokenizer.vocab_size()),
    };
    let start = Instant::now();
    let outputs = generate(&model, &prompts, &params)
        .with_context(|| format!("generating with {}", args.model.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    let new_tokens: usize = outputs.iter().map(|o| o.tokens.len()).sum();

    for (prompt, output) in prompts.iter().zip(&outputs) {
        let text = tokenizer.decode(&output.tokens)?;
        if args.json {
            let object = serde_json::json!({
                "prompt_tokens": prompt,
                "tokens": output.tokens,
                "text": text,
                "stopped_at_eos": output.stopped_at_eos,
            });
            println!("{object}");
        } else {
            println!("{text}");
        }
    }
    eprintln!(
        "{new_tokens} new tokens in {seconds:.2} s ({:.1} tokens/s, {})",
        new_tokens as f64 / seconds.max(1e-9),
        if args.no_cache {
            "no KV cache"
        } else {
            "KV cache"
        }
    );
    Ok(())
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Ok(Tokenizer::from_file(path)?)
}
