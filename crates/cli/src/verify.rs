//! `train verify`: a model on a device against the outputs `transformers` computed for it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use llama::reference::{verify, Reference};

#[derive(Args)]
pub struct VerifyArgs {
    /// A model directory holding reference outputs beside its weights (`golden.json` and
    /// `golden.safetensors`, as scripts/make_golden.py writes them; e.g. tests/fixtures/golden/*)
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// flex | cuda:N | tch:cpu | tch:cuda:N
    #[arg(long, default_value = "flex")]
    device: String,
    /// Print one JSON object per model instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    let device = llama::parse_device(&args.device)?;
    let mut failed = Vec::new();
    for dir in &args.model {
        let reference = Reference::load(dir)?;
        let (_, model) = llama::load_pretrained(dir, &device)
            .with_context(|| format!("loading {}", dir.display()))?;
        let checks =
            verify(&model, &reference).with_context(|| format!("checking {}", dir.display()))?;
        if args.json {
            let checks: serde_json::Map<String, serde_json::Value> = checks
                .iter()
                .map(|c| {
                    let value = serde_json::json!({
                        "measured": c.measured, "limit": c.limit, "passed": c.passed(),
                    });
                    (c.name.to_string(), value)
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "model": dir.display().to_string(), "device": args.device, "checks": checks,
                })
            );
        } else {
            println!("{} on {}:", dir.display(), args.device);
            for c in &checks {
                let verdict = if c.passed() { "ok" } else { "FAILED" };
                println!(
                    "  {:<18} {:>10.3e} (limit {:.2e})  {verdict}",
                    c.name, c.measured, c.limit
                );
            }
        }
        failed.extend(
            checks
                .iter()
                .filter(|c| !c.passed())
                .map(|c| format!("{} {}", dir.display(), c.name)),
        );
    }
    if !failed.is_empty() {
        bail!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
