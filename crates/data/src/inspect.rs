//! What `train data inspect` reports: counts, token-length percentiles, and examples rendered
//! with trained and masked tokens told apart.

use crate::chat::Rendered;
use crate::dataset::{percentile, LoadedData};
use crate::error::Result;
use crate::render::Tokenized;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Examples kept (train + eval).
    pub examples: usize,
    pub train: usize,
    pub eval: usize,
    /// Malformed records skipped (with `on_error = "skip"`).
    pub errors: usize,
    pub read: usize,
    pub truncated: usize,
    pub dropped: usize,
    /// Token counts per example (both sequences of a pair).
    pub tokens: Percentiles,
    pub total_tokens: usize,
    pub trained_tokens: usize,
    pub sources: Vec<crate::dataset::SourceStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    pub min: usize,
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
}

fn trained_count(r: &Rendered) -> usize {
    r.trained.iter().filter(|&&t| t).count()
}

pub fn summarize(data: &LoadedData) -> Summary {
    let items = data.train.iter().chain(&data.eval);
    let mut lengths: Vec<usize> = items.clone().map(|i| i.tokens.token_count()).collect();
    lengths.sort_unstable();
    let trained_tokens = items
        .map(|i| match &i.tokens {
            Tokenized::Sequence(r) => trained_count(r),
            Tokenized::Pair {
                chosen, rejected, ..
            } => trained_count(chosen) + trained_count(rejected),
            Tokenized::Prompt { .. } => 0,
        })
        .sum();
    let sum = |f: fn(&crate::dataset::SourceStats) -> usize| data.sources.iter().map(f).sum();
    Summary {
        examples: data.train.len() + data.eval.len(),
        train: data.train.len(),
        eval: data.eval.len(),
        errors: sum(|s| s.errors),
        read: sum(|s| s.read),
        truncated: sum(|s| s.truncated),
        dropped: sum(|s| s.dropped),
        tokens: Percentiles {
            min: lengths.first().copied().unwrap_or(0),
            p50: percentile(&lengths, 50.0),
            p90: percentile(&lengths, 90.0),
            p99: percentile(&lengths, 99.0),
            max: lengths.last().copied().unwrap_or(0),
        },
        total_tokens: lengths.iter().sum(),
        trained_tokens,
        sources: data.sources.clone(),
    }
}

/// How trained tokens are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marking {
    /// Green for trained, dim for masked (a terminal).
    Color,
    /// `[[` ... `]]` around trained spans.
    Brackets,
}

/// Decodes `ids` with trained spans marked. BOS and EOS are shown as `<s>` and `</s>`.
pub fn render_marked(
    tokenizer: &Tokenizer,
    ids: &[u32],
    trained: &[bool],
    marking: Marking,
) -> Result<String> {
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let is_trained = trained[start];
        let mut end = start;
        while end < ids.len() && trained[end] == is_trained {
            end += 1;
        }
        let mut text = String::new();
        let mut run = Vec::new();
        for &id in &ids[start..end] {
            if id == tokenizer.bos_id || id == tokenizer.eos_id {
                text.push_str(&tokenizer.decode(&run)?);
                run.clear();
                text.push_str(if id == tokenizer.bos_id {
                    "<s>"
                } else {
                    "</s>"
                });
            } else {
                run.push(id);
            }
        }
        text.push_str(&tokenizer.decode(&run)?);
        match (marking, is_trained) {
            (Marking::Color, true) => out.push_str(&format!("\x1b[32m{text}\x1b[0m")),
            (Marking::Color, false) => out.push_str(&format!("\x1b[2m{text}\x1b[0m")),
            (Marking::Brackets, true) => out.push_str(&format!("[[{text}]]")),
            (Marking::Brackets, false) => out.push_str(&text),
        }
        start = end;
    }
    Ok(out)
}

/// A readable rendering of one tokenized example.
pub fn render_item(tokenizer: &Tokenizer, tokens: &Tokenized, marking: Marking) -> Result<String> {
    Ok(match tokens {
        Tokenized::Sequence(r) => render_marked(tokenizer, &r.ids, &r.trained, marking)?,
        Tokenized::Pair {
            chosen,
            rejected,
            rating,
            margin,
            ..
        } => {
            let label = match (rating, margin) {
                (Some(r), _) => format!(" (rating: {})", r.name()),
                (None, Some(m)) => format!(" (margin: {m})"),
                _ => String::new(),
            };
            format!(
                "chosen{label}: {}\nrejected: {}",
                render_marked(tokenizer, &chosen.ids, &chosen.trained, marking)?,
                render_marked(tokenizer, &rejected.ids, &rejected.trained, marking)?
            )
        }
        Tokenized::Prompt { ids, category } => {
            let trained = vec![false; ids.len()];
            let label = category
                .as_deref()
                .map(|c| format!(" [{c}]"))
                .unwrap_or_default();
            format!(
                "prompt{label}: {}",
                render_marked(tokenizer, ids, &trained, marking)?
            )
        }
    })
}
