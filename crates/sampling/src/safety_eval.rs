//! `train eval safety`: answers to safety and benign prompt sets, with the refusal rate on each,
//! the false-refusal rate on the benign ones, and the safety reward model's view of the answers.

use std::path::{Path, PathBuf};

use data::load_prompts;
use data::Tokenizer;
use llama::{Llama, LlamaConfig};
use reward::RewardModel;
use serde::Serialize;
use trainer::Result;

use crate::answers::{generate_answers, score_answers, AnswerSettings};
use crate::refusal::RefusalDetector;

/// A prompt set to evaluate on.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub path: PathBuf,
    /// Benign prompts: refusals there are false refusals.
    pub benign: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScoreSummary {
    pub mean: f64,
    pub std: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
}

impl ScoreSummary {
    pub fn of(scores: &[f64]) -> Option<Self> {
        if scores.is_empty() {
            return None;
        }
        let reward::RewardStats { mean, std, .. } = reward::RewardStats::of(scores);
        let mut sorted = scores.to_vec();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[((p * (sorted.len() - 1) as f64).round()) as usize];
        Some(Self {
            mean,
            std,
            p10: q(0.1),
            p50: q(0.5),
            p90: q(0.9),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AnswerRecord {
    pub set: String,
    pub prompt: String,
    pub answer: String,
    pub refused: bool,
    pub ended_with_eos: bool,
    pub safety_score: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    pub name: String,
    pub path: PathBuf,
    pub benign: bool,
    pub prompts: usize,
    pub refusal_rate: f64,
    pub safety_score: Option<ScoreSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SafetyReport {
    pub sets: Vec<SetReport>,
    /// Over all non-benign sets.
    pub refusal_rate: Option<f64>,
    /// Over all benign sets.
    pub false_refusal_rate: Option<f64>,
    pub safety_score: Option<ScoreSummary>,
    pub refusal_phrases: Vec<String>,
    #[serde(skip)]
    pub answers: Vec<AnswerRecord>,
}

/// Evaluates `model` on each prompt set (at most `limit` prompts from each).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Llama,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    sets: &[PromptSet],
    reward_model: Option<&RewardModel>,
    detector: &RefusalDetector,
    settings: &AnswerSettings,
    limit: Option<usize>,
) -> Result<SafetyReport> {
    let mut reports = Vec::new();
    let mut answers_out = Vec::new();
    let (mut refused, mut unsafe_total) = (0usize, 0usize);
    let (mut false_refused, mut benign_total) = (0usize, 0usize);
    let mut all_scores = Vec::new();
    for set in sets {
        let mut prompts = load_prompts(&set.path)?;
        if let Some(limit) = limit {
            prompts.truncate(limit);
        }
        let answers = generate_answers(model, config, tokenizer, &prompts, None, settings, 1)?;
        let scores = match reward_model {
            Some(rm) => Some(score_answers(
                rm,
                tokenizer,
                &prompts,
                &answers,
                settings.batch_size,
            )?),
            None => None,
        };
        let name = set_name(&set.path);
        let flags: Vec<bool> = answers
            .iter()
            .map(|a| detector.is_refusal(&a.text))
            .collect();
        let count = flags.iter().filter(|&&f| f).count();
        if set.benign {
            false_refused += count;
            benign_total += answers.len();
        } else {
            refused += count;
            unsafe_total += answers.len();
        }
        if let Some(s) = &scores {
            all_scores.extend_from_slice(s);
        }
        for (i, a) in answers.iter().enumerate() {
            answers_out.push(AnswerRecord {
                set: name.clone(),
                prompt: prompts[a.prompt].text().to_string(),
                answer: a.text.clone(),
                refused: flags[i],
                ended_with_eos: a.ended,
                safety_score: scores.as_ref().map(|s| s[i]),
            });
        }
        reports.push(SetReport {
            name,
            path: set.path.clone(),
            benign: set.benign,
            prompts: answers.len(),
            refusal_rate: count as f64 / answers.len().max(1) as f64,
            safety_score: scores.as_deref().and_then(ScoreSummary::of),
        });
    }
    let rate = |n: usize, total: usize| (total > 0).then(|| n as f64 / total as f64);
    Ok(SafetyReport {
        sets: reports,
        refusal_rate: rate(refused, unsafe_total),
        false_refusal_rate: rate(false_refused, benign_total),
        safety_score: ScoreSummary::of(&all_scores),
        refusal_phrases: detector.phrases().to_vec(),
        answers: answers_out,
    })
}

fn set_name(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}
