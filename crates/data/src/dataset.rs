//! Loading a recipe's `[data]` section: sources in several formats, mixed by count or fraction,
//! validated, tokenized, shuffled and split deterministically from the seed, with every kept,
//! truncated, dropped and bad example counted.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::format::{parse_record, Format};
use crate::read::RecordReader;
use crate::render::{tokenize_example, LengthOutcome, LengthPolicy, Tokenized, Truncation};
use crate::tokenizer::Tokenizer;

/// What to do with a malformed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop before training with an error naming file, line and field.
    #[default]
    Stop,
    /// Skip the record and count it.
    Skip,
}

/// One data file of a mixture.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub path: PathBuf,
    /// Format name; detected from the records when absent.
    #[serde(default)]
    pub format: Option<String>,
    /// Take this many examples (after shuffling with the seed).
    #[serde(default)]
    pub count: Option<usize>,
    /// Or this fraction of the source's examples.
    #[serde(default)]
    pub fraction: Option<f64>,
}

impl SourceConfig {
    /// The whole of one file, in the given format (detected when `None`).
    pub fn file(path: impl Into<PathBuf>, format: Option<&str>) -> Self {
        Self {
            path: path.into(),
            format: format.map(str::to_string),
            count: None,
            fraction: None,
        }
    }
}

/// The `[data]` section of a recipe.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A single training file (shorthand for one source).
    #[serde(default)]
    pub train: Option<PathBuf>,
    #[serde(default)]
    pub format: Option<String>,
    /// Several sources mixed together (`[[data.sources]]`).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// A separate evaluation file, or a fraction held out from the training data.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    #[serde(default)]
    pub eval_fraction: Option<f64>,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub truncation: Truncation,
    /// Concatenate short SFT examples into sequences of `max_seq_len` (as Llama 2 did).
    #[serde(default)]
    pub packing: bool,
    #[serde(default)]
    pub train_on_inputs: bool,
    #[serde(default)]
    pub on_error: OnError,
    /// Group examples of similar length into batches to save padding.
    #[serde(default = "default_true")]
    pub bucket_by_length: bool,
}

fn default_max_seq_len() -> usize {
    2048
}
fn default_true() -> bool {
    true
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: None,
            format: None,
            sources: Vec::new(),
            eval: None,
            eval_fraction: None,
            max_seq_len: default_max_seq_len(),
            truncation: Truncation::default(),
            packing: false,
            train_on_inputs: false,
            on_error: OnError::default(),
            bucket_by_length: true,
        }
    }
}

impl DataConfig {
    /// A configuration for plain files (no recipe), one source per file.
    pub fn for_files(
        files: &[PathBuf],
        format: Option<&str>,
        max_seq_len: usize,
        truncation: Truncation,
        on_error: OnError,
    ) -> Self {
        Self {
            sources: files
                .iter()
                .map(|path| SourceConfig::file(path, format))
                .collect(),
            max_seq_len,
            truncation,
            on_error,
            ..Self::default()
        }
    }

    /// All sources, the `train` shorthand included, with paths resolved against `base`
    /// (the recipe's directory).
    pub fn resolved_sources(&self, base: &Path) -> Result<Vec<SourceConfig>> {
        if let Some(name) = &self.format {
            if Format::parse(name).is_none() {
                return Err(DataError::Config(format!(
                    "`format`: unknown format `{name}` (expected one of {})",
                    Format::ALL.map(|f| f.name()).join(", ")
                )));
            }
        }
        let mut sources = Vec::new();
        if let Some(train) = &self.train {
            sources.push(SourceConfig::file(train, self.format.as_deref()));
        }
        // `[data] format` is the default of every source that names none.
        sources.extend(self.sources.iter().cloned().map(|mut source| {
            if source.format.is_none() {
                source.format = self.format.clone();
            }
            source
        }));
        if sources.is_empty() {
            return Err(DataError::Config(
                "[data] needs `train` or at least one [[data.sources]]".into(),
            ));
        }
        for source in &mut sources {
            if source.path.is_relative() {
                source.path = base.join(&source.path);
            }
            if source.count.is_some() && source.fraction.is_some() {
                return Err(DataError::Config(format!(
                    "{}: give `count` or `fraction`, not both",
                    source.path.display()
                )));
            }
            if let Some(f) = source.fraction {
                if !(0.0..=1.0).contains(&f) {
                    return Err(DataError::Config(format!(
                        "{}: `fraction` must be within [0, 1], got {f}",
                        source.path.display()
                    )));
                }
            }
            if let Some(name) = &source.format {
                if Format::parse(name).is_none() {
                    return Err(DataError::Config(format!(
                        "{}: unknown format `{name}` (expected one of {})",
                        source.path.display(),
                        Format::ALL.map(|f| f.name()).join(", ")
                    )));
                }
            }
        }
        if self.eval.is_some() && self.eval_fraction.is_some() {
            return Err(DataError::Config(
                "give `eval` or `eval_fraction`, not both".into(),
            ));
        }
        if let Some(f) = self.eval_fraction {
            if !(0.0..1.0).contains(&f) {
                return Err(DataError::Config(format!(
                    "`eval_fraction` must be within [0, 1), got {f}"
                )));
            }
        }
        if self.max_seq_len < 2 {
            return Err(DataError::Config("`max_seq_len` must be at least 2".into()));
        }
        Ok(sources)
    }

    pub fn policy(&self) -> LengthPolicy {
        LengthPolicy {
            max_seq_len: self.max_seq_len,
            truncation: self.truncation,
            train_on_inputs: self.train_on_inputs,
        }
    }
}

/// Counts for one source; nothing is dropped without being counted here.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SourceStats {
    pub path: PathBuf,
    pub format: String,
    /// Whether the format was detected rather than given.
    pub detected: bool,
    /// Records read (good or bad).
    pub read: usize,
    /// Examples that passed validation and the length policy.
    pub valid: usize,
    /// Of those, how many were selected by `count`/`fraction`.
    pub selected: usize,
    pub truncated: usize,
    pub dropped: usize,
    /// Malformed records skipped with `on_error = "skip"`.
    pub errors: usize,
    /// The first few error messages, for the report.
    pub error_samples: Vec<String>,
}

/// A tokenized example and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub tokens: Tokenized,
    pub source: usize,
    pub line: usize,
}

/// The loaded data: shuffled training and evaluation examples, with their counts.
#[derive(Debug, Clone, Default)]
pub struct LoadedData {
    pub train: Vec<Item>,
    pub eval: Vec<Item>,
    pub sources: Vec<SourceStats>,
}

impl LoadedData {
    pub fn errors(&self) -> usize {
        self.sources.iter().map(|s| s.errors).sum()
    }
}

/// Records tokenized together in parallel.
const CHUNK: usize = 1024;

/// Reads one file: every record is parsed, validated and tokenized, keeping only token ids.
pub fn load_source(
    source: &SourceConfig,
    tokenizer: &Tokenizer,
    policy: &LengthPolicy,
    on_error: OnError,
) -> Result<(Vec<Item>, SourceStats)> {
    let reader = RecordReader::open(&source.path)?;
    let given = source.format.as_deref().and_then(Format::parse);
    let mut format = given;
    let mut stats = SourceStats {
        path: source.path.clone(),
        detected: given.is_none(),
        ..SourceStats::default()
    };
    let mut items = Vec::new();
    let fail = |error: DataError, stats: &mut SourceStats| -> Result<()> {
        match on_error {
            // A file that cannot be read is not a malformed record: skipping cannot help.
            _ if matches!(error, DataError::File { .. }) => Err(error),
            OnError::Stop => Err(error),
            OnError::Skip => {
                stats.errors += 1;
                if stats.error_samples.len() < 5 {
                    stats.error_samples.push(error.to_string());
                }
                Ok(())
            }
        }
    };
    // Records are parsed in order (format detection needs the first good one), then
    // tokenized in parallel a chunk at a time, then counted in order again.
    let mut records = reader.peekable();
    while records.peek().is_some() {
        let mut parsed = Vec::with_capacity(CHUNK);
        for record in records.by_ref().take(CHUNK) {
            stats.read += 1;
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    fail(e, &mut stats)?;
                    continue;
                }
            };
            let record_error = |field: Option<String>, message: String| DataError::Record {
                path: source.path.clone(),
                line: record.line,
                field,
                message,
            };
            let fmt = match format.or_else(|| Format::detect(&record.value)) {
                Some(f) => {
                    format = Some(f);
                    f
                }
                None => {
                    let e = record_error(
                        None,
                        "cannot tell the format from this record's fields; set `format`".into(),
                    );
                    fail(e, &mut stats)?;
                    continue;
                }
            };
            match parse_record(fmt, &record.value) {
                Ok(example) => parsed.push((record.line, example)),
                Err(e) => fail(record_error(e.field, e.message), &mut stats)?,
            }
        }
        let tokenized: Vec<_> = parsed
            .par_iter()
            .map(|(_, example)| tokenize_example(tokenizer, example, policy))
            .collect();
        for ((line, _), result) in parsed.iter().zip(tokenized) {
            let (tokens, outcome) = match result {
                Ok(t) => t,
                Err(e) => {
                    let e = DataError::Record {
                        path: source.path.clone(),
                        line: *line,
                        field: None,
                        message: e.to_string(),
                    };
                    fail(e, &mut stats)?;
                    continue;
                }
            };
            match outcome {
                LengthOutcome::Kept => {}
                LengthOutcome::Truncated => stats.truncated += 1,
                LengthOutcome::Dropped => stats.dropped += 1,
            }
            if let Some(tokens) = tokens {
                items.push(Item {
                    tokens,
                    source: 0,
                    line: *line,
                });
            }
        }
    }
    stats.format = format.map_or("unknown", Format::name).to_string();
    stats.valid = items.len();
    Ok((items, stats))
}

/// Loads every source of `config`, applies counts and fractions, shuffles with `seed` and
/// splits off the evaluation set. The same seed always gives the same examples in the same
/// order.
pub fn load_data(
    config: &DataConfig,
    base: &Path,
    tokenizer: &Tokenizer,
    seed: u64,
) -> Result<LoadedData> {
    let sources = config.resolved_sources(base)?;
    let policy = config.policy();
    let mut loaded = LoadedData::default();
    for (index, source) in sources.iter().enumerate() {
        let (mut items, mut stats) = load_source(source, tokenizer, &policy, config.on_error)?;
        // Each source has its own stream, so adding a source does not reshuffle the others.
        let mut rng =
            StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index as u64 + 1)));
        items.shuffle(&mut rng);
        let take = match (source.count, source.fraction) {
            (Some(count), _) => {
                if count > items.len() {
                    return Err(DataError::Config(format!(
                        "{}: `count` = {count} but the file has only {} usable examples",
                        source.path.display(),
                        items.len()
                    )));
                }
                count
            }
            (None, Some(f)) => (items.len() as f64 * f).round() as usize,
            (None, None) => items.len(),
        };
        items.truncate(take);
        for item in &mut items {
            item.source = index;
        }
        stats.selected = items.len();
        loaded.train.extend(items);
        loaded.sources.push(stats);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    loaded.train.shuffle(&mut rng);

    if let Some(eval) = &config.eval {
        let path = if eval.is_relative() {
            base.join(eval)
        } else {
            eval.clone()
        };
        let source = SourceConfig::file(path, config.format.as_deref());
        let (mut items, mut stats) = load_source(&source, tokenizer, &policy, config.on_error)?;
        let index = loaded.sources.len();
        for item in &mut items {
            item.source = index;
        }
        stats.selected = items.len();
        loaded.eval = items;
        loaded.sources.push(stats);
    } else if let Some(fraction) = config.eval_fraction {
        let n_eval = (loaded.train.len() as f64 * fraction).round() as usize;
        loaded.eval = loaded.train.split_off(loaded.train.len() - n_eval);
    }
    Ok(loaded)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
