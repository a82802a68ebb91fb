//! Examples to token ids: the chat template, loss masks by position, and the length policy.

use crate::chat::{encode_answer, render_dialog, Rendered};
use crate::error::Result;
use crate::format::{Example, Rating};
use crate::tokenizer::Tokenizer;

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Drop prompt tokens from the left (BOS stays); if the answer alone is still too long,
    /// cut its end.
    #[default]
    TruncatePrompt,
    /// Cut the end of the sequence (the answer).
    TruncateAnswer,
    /// Drop the example.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthPolicy {
    pub max_seq_len: usize,
    pub truncation: Truncation,
    /// Train on every token, not only on answers.
    pub train_on_inputs: bool,
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub enum Tokenized {
    /// SFT or language-modelling sequence with its trained mask.
    Sequence(Rendered),
    /// Chosen and rejected, each prompt + answer; `prompt_len` tokens are shared.
    Pair {
        chosen: Rendered,
        rejected: Rendered,
        prompt_len: usize,
        rating: Option<Rating>,
        margin: Option<f32>,
    },
    /// A generation prompt.
    Prompt {
        ids: Vec<u32>,
        category: Option<String>,
    },
}

impl Tokenized {
    /// Tokens this example contributes (both sequences of a pair).
    pub fn token_count(&self) -> usize {
        match self {
            Tokenized::Sequence(r) => r.ids.len(),
            Tokenized::Pair {
                chosen, rejected, ..
            } => chosen.ids.len() + rejected.ids.len(),
            Tokenized::Prompt { ids, .. } => ids.len(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthOutcome {
    Kept,
    Truncated,
    Dropped,
}

/// Tokenizes an example and applies the length policy. Text far longer than `max_seq_len`
/// tokens could cover is cut before tokenizing (see [`cap_text`]), so one huge record costs
/// memory in proportion to `max_seq_len`, not to its size.
pub fn tokenize_example(
    tokenizer: &Tokenizer,
    example: &Example,
    policy: &LengthPolicy,
) -> Result<(Option<Tokenized>, LengthOutcome)> {
    let max = policy.max_seq_len;
    let cap = text_cap(tokenizer, max);
    let capped = cap_example(example, cap);
    let example = capped.as_ref().unwrap_or(example);
    match example {
        Example::Dialog(messages) => {
            let mut rendered = render_dialog(tokenizer, messages)?;
            if policy.train_on_inputs {
                rendered.trained.iter_mut().skip(1).for_each(|t| *t = true);
            }
            Ok(fit_sequence(rendered, max, policy.truncation))
        }
        Example::Text(text) => {
            let mut ids = tokenizer.encode_with_bos(text)?;
            ids.push(tokenizer.eos_id);
            let mut trained = vec![true; ids.len()];
            trained[0] = false;
            Ok(fit_sequence(
                Rendered { ids, trained },
                max,
                policy.truncation,
            ))
        }
        Example::Pair(pair) => {
            let mut prompt = render_dialog(tokenizer, &pair.prompt)?.ids;
            let mut chosen = encode_answer(tokenizer, &pair.chosen)?;
            let mut rejected = encode_answer(tokenizer, &pair.rejected)?;
            let longest = chosen.len().max(rejected.len());
            let mut outcome = LengthOutcome::Kept;
            if prompt.len() + longest > max {
                outcome = LengthOutcome::Truncated;
                match policy.truncation {
                    Truncation::Drop => return Ok((None, LengthOutcome::Dropped)),
                    Truncation::TruncatePrompt => {
                        let excess = prompt.len() + longest - max;
                        drop_after_bos(&mut prompt, excess);
                    }
                    Truncation::TruncateAnswer => {}
                }
                let room = max.saturating_sub(prompt.len());
                if room == 0 {
                    return Ok((None, LengthOutcome::Dropped));
                }
                chosen.truncate(room);
                rejected.truncate(room);
                if chosen == rejected {
                    // Nothing left tells the two answers apart.
                    return Ok((None, LengthOutcome::Dropped));
                }
            }
            let join = |answer: Vec<u32>| {
                let mut r = Rendered {
                    ids: prompt.clone(),
                    trained: vec![false; prompt.len()],
                };
                r.trained.extend(vec![true; answer.len()]);
                r.ids.extend(answer);
                r
            };
            Ok((
                Some(Tokenized::Pair {
                    prompt_len: prompt.len(),
                    chosen: join(chosen),
                    rejected: join(rejected),
                    rating: pair.rating,
                    margin: pair.margin,
                }),
                outcome,
            ))
        }
        Example::Prompt { messages, category } => {
            let mut ids = render_dialog(tokenizer, messages)?.ids;
            let mut outcome = LengthOutcome::Kept;
            if ids.len() > max {
                match policy.truncation {
                    Truncation::TruncatePrompt => {
                        let excess = ids.len() - max;
                        drop_after_bos(&mut ids, excess);
                        outcome = LengthOutcome::Truncated;
                    }
                    // A prompt cut at its end loses its "[/INST]": unusable.
                    _ => return Ok((None, LengthOutcome::Dropped)),
                }
            }
            Ok((
                Some(Tokenized::Prompt {
                    ids,
                    category: category.clone(),
                }),
                outcome,
            ))
        }
    }
}

/// Bytes of text that always make more than `max_seq_len` tokens, with a margin of two: no token
/// covers more bytes than the longest entry of the vocabulary. Keeping this many bytes of a
/// longer text (its start or its end, whichever the length policy keeps) leaves the kept
/// tokens far from the cut.
fn text_cap(tokenizer: &Tokenizer, max_seq_len: usize) -> usize {
    max_seq_len
        .saturating_add(16)
        .saturating_mul(tokenizer.max_token_bytes().max(4))
        .saturating_mul(2)
}

/// The example with every text over `cap` bytes cut to `cap` (`None` when none is): answers and
/// plain text keep their start (the policy cuts their end), prompt-side messages their end (the
/// policy drops prompt tokens from the left).
fn cap_example(example: &Example, cap: usize) -> Option<Example> {
    let long = |text: &str| text.len() > cap;
    let any_long = match example {
        Example::Dialog(messages) | Example::Prompt { messages, .. } => {
            messages.iter().any(|m| long(&m.content))
        }
        Example::Pair(pair) => {
            long(&pair.chosen)
                || long(&pair.rejected)
                || pair.prompt.iter().any(|m| long(&m.content))
        }
        Example::Text(text) => long(text),
    };
    if !any_long {
        return None;
    }
    let keep_end = |messages: &[crate::chat::Message]| -> Vec<crate::chat::Message> {
        messages
            .iter()
            .map(|m| crate::chat::Message {
                role: m.role,
                content: cap_text(&m.content, cap, true).to_string(),
            })
            .collect()
    };
    Some(match example {
        Example::Dialog(messages) => {
            let mut capped = keep_end(messages);
            if let (Some(last), Some(original)) = (capped.last_mut(), messages.last()) {
                last.content = cap_text(&original.content, cap, false).to_string();
            }
            Example::Dialog(capped)
        }
        Example::Prompt { messages, category } => Example::Prompt {
            messages: keep_end(messages),
            category: category.clone(),
        },
        Example::Pair(pair) => Example::Pair(crate::format::PreferencePair {
            prompt: keep_end(&pair.prompt),
            chosen: cap_text(&pair.chosen, cap, false).to_string(),
            rejected: cap_text(&pair.rejected, cap, false).to_string(),
            ..pair.clone()
        }),
        Example::Text(text) => Example::Text(cap_text(text, cap, false).to_string()),
    })
}

/// At most `cap` bytes of `text`, cut at a character boundary: its end with `keep_end`, else
/// its start.
pub fn cap_text(text: &str, cap: usize, keep_end: bool) -> &str {
    if text.len() <= cap {
        return text;
    }
    if keep_end {
        let mut start = text.len() - cap;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        &text[start..]
    } else {
        let mut end = cap;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }
}

fn fit_sequence(
    mut r: Rendered,
    max: usize,
    truncation: Truncation,
) -> (Option<Tokenized>, LengthOutcome) {
    if r.ids.len() <= max {
        return (Some(Tokenized::Sequence(r)), LengthOutcome::Kept);
    }
    match truncation {
        Truncation::Drop => return (None, LengthOutcome::Dropped),
        Truncation::TruncatePrompt => {
            // Remove leading tokens after BOS, but never past the last answer's start.
            let last_answer = r
                .trained
                .iter()
                .rposition(|&t| !t)
                .map_or(r.ids.len(), |i| i + 1);
            let excess = r.ids.len() - max;
            let removable = last_answer.saturating_sub(1).min(excess);
            drop_after_bos(&mut r.ids, removable);
            drop_after_bos(&mut r.trained, removable);
            r.ids.truncate(max);
            r.trained.truncate(max);
        }
        Truncation::TruncateAnswer => {
            r.ids.truncate(max);
            r.trained.truncate(max);
        }
    }
    if !r.trained.iter().any(|&t| t) {
        return (None, LengthOutcome::Dropped);
    }
    (Some(Tokenized::Sequence(r)), LengthOutcome::Truncated)
}

/// A packed training sequence: several examples back to back. `positions` restart at 0 and
/// `segments` change at every example, so a trainer can keep examples from attending to
/// each other.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    pub positions: Vec<usize>,
    pub segments: Vec<u32>,
}

/// Packs sequences in order, starting a new pack when the next one does not fit. Examples are
/// never split across packs.
pub fn pack(sequences: &[Rendered], max_len: usize) -> Vec<Packed> {
    let mut packs: Vec<Packed> = Vec::new();
    let mut current = Packed::default();
    let mut segment = 0u32;
    for seq in sequences {
        if !current.ids.is_empty() && current.ids.len() + seq.ids.len() > max_len {
            packs.push(std::mem::take(&mut current));
            segment = 0;
        }
        current.ids.extend(&seq.ids);
        current.trained.extend(&seq.trained);
        current.positions.extend(0..seq.ids.len());
        current
            .segments
            .extend(std::iter::repeat_n(segment, seq.ids.len()));
        segment += 1;
    }
    if !current.ids.is_empty() {
        packs.push(current);
    }
    packs
}

/// Left truncation, the one way prompts are shortened: removes up to `count` of the oldest
/// tokens after the first (BOS), so the end of the prompt (its last `[/INST]`) survives.
pub fn drop_after_bos<T>(row: &mut Vec<T>, count: usize) {
    let count = count.min(row.len().saturating_sub(1));
    row.drain(1..1 + count);
}
