//! The record formats users bring, parsed into [`Example`]s with field-level errors.

use serde_json::Value;

use crate::chat::{Message, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `instruction`, optional `input`, `output`.
    Alpaca,
    /// `messages`: a list of `{role, content}` ending with an assistant turn.
    Messages,
    /// Anthropic HH-RLHF transcripts: `{chosen, rejected}` pairs, or one `text` transcript.
    HhRlhf,
    /// `{prompt, chosen, rejected}` with optional `rating` or `margin`.
    Preference,
    /// `{prompt}` or `{messages}` ending with a user turn, with optional `category`.
    Prompts,
    /// `{text}`: language modelling on every token.
    Text,
    /// `{prompt, response}`: one answer to a prompt (a string or messages ending with a user
    /// turn); what `train score` scores, and usable as SFT data.
    PromptResponse,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::Alpaca,
        Format::Messages,
        Format::HhRlhf,
        Format::Preference,
        Format::Prompts,
        Format::Text,
        Format::PromptResponse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Messages => "messages",
            Format::HhRlhf => "hh-rlhf",
            Format::Preference => "preference",
            Format::Prompts => "prompts",
            Format::Text => "text",
            Format::PromptResponse => "prompt-response",
        }
    }

    pub fn parse(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Recognises the format from a record's fields.
    pub fn detect(value: &Value) -> Option<Format> {
        let object = value.as_object()?;
        let has = |k: &str| object.contains_key(k);
        if has("chosen") && has("rejected") {
            return Some(if has("prompt") {
                Format::Preference
            } else {
                Format::HhRlhf
            });
        }
        if has("instruction") {
            return Some(Format::Alpaca);
        }
        if has("messages") {
            let last_role = object["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m.get("role"))
                .and_then(|r| r.as_str());
            return Some(if last_role == Some("user") || has("category") {
                Format::Prompts
            } else {
                Format::Messages
            });
        }
        if has("prompt") && has("response") {
            return Some(Format::PromptResponse);
        }
        if has("prompt") {
            return Some(Format::Prompts);
        }
        if let Some(text) = object.get("text").and_then(|t| t.as_str()) {
            return Some(if text.starts_with("\n\nHuman:") {
                Format::HhRlhf
            } else {
                Format::Text
            });
        }
        None
    }
}

/// The annotators' preference strength in Llama 2's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Rating {
    SignificantlyBetter,
    Better,
    SlightlyBetter,
    NegligiblyBetter,
}

impl Rating {
    pub const ALL: [Rating; 4] = [
        Rating::SignificantlyBetter,
        Rating::Better,
        Rating::SlightlyBetter,
        Rating::NegligiblyBetter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rating::SignificantlyBetter => "significantly better",
            Rating::Better => "better",
            Rating::SlightlyBetter => "slightly better",
            Rating::NegligiblyBetter => "negligibly better / unsure",
        }
    }

    pub fn parse(text: &str) -> Option<Rating> {
        let t = text.trim().to_ascii_lowercase().replace(['_', '-'], " ");
        match t.as_str() {
            "significantly better" => Some(Rating::SignificantlyBetter),
            "better" => Some(Rating::Better),
            "slightly better" => Some(Rating::SlightlyBetter),
            "negligibly better / unsure"
            | "negligibly better"
            | "unsure"
            | "negligibly better/unsure" => Some(Rating::NegligiblyBetter),
            _ => None,
        }
    }
}

/// A preference pair: a prompt (a dialog ending with a user turn) and two answers.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub rating: Option<Rating>,
    pub margin: Option<f32>,
    /// For HH-RLHF transcripts: the shared transcript text before the answers, so that
    /// `raw_prompt + chosen` is exactly the original `chosen` transcript (answers are kept raw).
    pub raw_prompt: Option<String>,
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A dialog whose assistant turns are trained (alpaca, messages, one HH transcript).
    Dialog(Vec<Message>),
    Pair(PreferencePair),
    /// A prompt to sample from (PPO, evaluation), with its category (e.g. `safety`).
    Prompt {
        messages: Vec<Message>,
        category: Option<String>,
    },
    /// Plain text, trained on every token.
    Text(String),
}

/// What is wrong with a record, and in which field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_string()),
            message: message.into(),
        }
    }
}

type Parsed<T> = std::result::Result<T, FieldError>;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string_field<'a>(value: &'a Value, field: &str) -> Parsed<&'a str> {
    match value.get(field) {
        None => Err(FieldError::new(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(FieldError::new(
            field,
            format!("must be a string, found {}", type_name(other)),
        )),
    }
}

fn non_empty<'a>(value: &'a Value, field: &str) -> Parsed<&'a str> {
    let s = string_field(value, field)?;
    if s.trim().is_empty() {
        return Err(FieldError::new(field, "is empty"));
    }
    Ok(s)
}

fn optional_string<'a>(value: &'a Value, field: &str) -> Parsed<Option<&'a str>> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(FieldError::new(
            field,
            format!("must be a string, found {}", type_name(other)),
        )),
    }
}

/// Parses `{role, content}` objects; checks roles, order and non-empty content.
fn parse_messages(value: &Value, field: &str) -> Parsed<Vec<Message>> {
    let list = match value {
        Value::Array(list) => list,
        other => {
            return Err(FieldError::new(
                field,
                format!("must be a list of messages, found {}", type_name(other)),
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let role = match item.get("role").and_then(|r| r.as_str()) {
            Some("system") => Role::System,
            Some("user") | Some("human") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(FieldError::new(
                    &format!("{at}.role"),
                    format!("unknown role `{other}` (expected system, user or assistant)"),
                ))
            }
            None => {
                return Err(FieldError::new(
                    &format!("{at}.role"),
                    "missing or not a string",
                ))
            }
        };
        let content = non_empty(item, "content")
            .map_err(|e| FieldError::new(&format!("{at}.content"), e.message))?;
        messages.push(Message::new(role, content));
    }
    check_alternation(&messages, field)?;
    Ok(messages)
}

/// An optional system message first, then user and assistant alternating from the user.
fn check_alternation(messages: &[Message], field: &str) -> Parsed<()> {
    let turns = match messages.first() {
        Some(m) if m.role == Role::System => &messages[1..],
        _ => messages,
    };
    if turns.is_empty() {
        return Err(FieldError::new(field, "has no user turn"));
    }
    for (i, m) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role != expected {
            return Err(FieldError::new(
                field,
                format!(
                    "turns must alternate user/assistant starting with the user; turn {} is {:?}",
                    i + 1,
                    m.role
                ),
            ));
        }
    }
    Ok(())
}

fn ends_with(messages: &[Message], role: Role, field: &str) -> Parsed<()> {
    if messages.last().map(|m| m.role) != Some(role) {
        return Err(FieldError::new(
            field,
            format!(
                "must end with a{} {:?} turn",
                if role == Role::Assistant { "n" } else { "" },
                role
            )
            .to_lowercase(),
        ));
    }
    Ok(())
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Splits an HH-RLHF transcript into turns. Consecutive turns of the same speaker (a few
/// occur in the real data) are merged into one, joined by a blank line. Empty turns are kept:
/// the real data has them, including empty preferred answers (saying nothing was judged better
/// than a harmful answer).
pub fn parse_transcript(text: &str, field: &str) -> Parsed<Vec<Message>> {
    if !text.starts_with(HUMAN) {
        return Err(FieldError::new(
            field,
            "transcript must start with \"\\n\\nHuman:\"",
        ));
    }
    let mut markers: Vec<(usize, Role, usize)> = Vec::new();
    let mut search = 0;
    while search < text.len() {
        let human = text[search..]
            .find(HUMAN)
            .map(|i| (i + search, Role::User, HUMAN.len()));
        let assistant = text[search..]
            .find(ASSISTANT)
            .map(|i| (i + search, Role::Assistant, ASSISTANT.len()));
        let next = match (human, assistant) {
            (Some(h), Some(a)) => Some(if h.0 < a.0 { h } else { a }),
            (h, a) => h.or(a),
        };
        let Some(marker) = next else { break };
        search = marker.0 + marker.2;
        markers.push(marker);
    }
    let mut messages: Vec<Message> = Vec::new();
    for (k, &(start, role, len)) in markers.iter().enumerate() {
        let end = markers.get(k + 1).map_or(text.len(), |m| m.0);
        let content = text[start + len..end].trim();
        match messages.last_mut() {
            Some(last) if last.role == role => {
                if !content.is_empty() {
                    last.content.push_str("\n\n");
                    last.content.push_str(content);
                }
            }
            _ => messages.push(Message::new(role, content)),
        }
    }
    check_alternation(&messages, field)?;
    Ok(messages)
}

/// Splits two transcripts into their shared prompt (up to and including the last
/// "\n\nAssistant:" they share) and the two raw answers.
fn split_pair(chosen: &str, rejected: &str) -> Parsed<(String, String, String)> {
    let common = chosen
        .bytes()
        .zip(rejected.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let mut cut = common;
    while !chosen.is_char_boundary(cut) {
        cut -= 1;
    }
    let Some(marker) = chosen[..cut].rfind(ASSISTANT) else {
        return Err(FieldError::new(
            "rejected",
            "chosen and rejected share no \"\\n\\nAssistant:\" turn",
        ));
    };
    let split = marker + ASSISTANT.len();
    Ok((
        chosen[..split].to_string(),
        chosen[split..].to_string(),
        rejected[split..].to_string(),
    ))
}

fn parse_margin(value: &Value) -> Parsed<Option<f32>> {
    match value.get("margin") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let m = n.as_f64().unwrap_or(f64::NAN) as f32;
            if !m.is_finite() {
                return Err(FieldError::new("margin", "must be a finite number"));
            }
            Ok(Some(m))
        }
        Some(other) => Err(FieldError::new(
            "margin",
            format!("must be a number, found {}", type_name(other)),
        )),
    }
}

fn parse_rating(value: &Value) -> Parsed<Option<Rating>> {
    match optional_string(value, "rating")? {
        None => Ok(None),
        Some(text) => Rating::parse(text).map(Some).ok_or_else(|| {
            FieldError::new(
                "rating",
                format!(
                    "unknown rating `{text}` (expected one of: {})",
                    Rating::ALL.map(|r| r.name()).join(", ")
                ),
            )
        }),
    }
}

/// A prompt given as a string or as a message list ending with a user turn.
fn parse_prompt(value: &Value, field: &str) -> Parsed<Vec<Message>> {
    match value.get(field) {
        None => Err(FieldError::new(field, "missing")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(FieldError::new(field, "is empty")),
        Some(Value::String(s)) => Ok(vec![Message::new(Role::User, s.as_str())]),
        Some(list @ Value::Array(_)) => {
            let messages = parse_messages(list, field)?;
            ends_with(&messages, Role::User, field)?;
            Ok(messages)
        }
        Some(other) => Err(FieldError::new(
            field,
            format!(
                "must be a string or a list of messages, found {}",
                type_name(other)
            ),
        )),
    }
}

/// Parses one record of the given format.
pub fn parse_record(format: Format, value: &Value) -> Parsed<Example> {
    if !value.is_object() {
        return Err(FieldError {
            field: None,
            message: format!("expected a JSON object, found {}", type_name(value)),
        });
    }
    match format {
        Format::Alpaca => {
            let instruction = non_empty(value, "instruction")?;
            let input = optional_string(value, "input")?.unwrap_or("").trim();
            let output = non_empty(value, "output")?;
            let user = if input.is_empty() {
                instruction.trim().to_string()
            } else {
                format!("{}\n\n{input}", instruction.trim())
            };
            Ok(Example::Dialog(vec![
                Message::new(Role::User, user),
                Message::new(Role::Assistant, output),
            ]))
        }
        Format::Messages => {
            let list = value
                .get("messages")
                .ok_or_else(|| FieldError::new("messages", "missing"))?;
            let messages = parse_messages(list, "messages")?;
            ends_with(&messages, Role::Assistant, "messages")?;
            Ok(Example::Dialog(messages))
        }
        Format::HhRlhf => {
            if value.get("chosen").is_none() && value.get("text").is_some() {
                let text = non_empty(value, "text")?;
                let messages = parse_transcript(text, "text")?;
                ends_with(&messages, Role::Assistant, "text")?;
                if messages.last().is_some_and(|m| m.content.is_empty()) {
                    return Err(FieldError::new(
                        "text",
                        "the final assistant answer is empty",
                    ));
                }
                return Ok(Example::Dialog(messages));
            }
            let chosen = non_empty(value, "chosen")?;
            let rejected = non_empty(value, "rejected")?;
            if chosen == rejected {
                return Err(FieldError::new("rejected", "identical to `chosen`"));
            }
            let (raw_prompt, chosen_answer, rejected_answer) = split_pair(chosen, rejected)?;
            // Validate both transcripts' structure (alternation, non-empty turns).
            parse_transcript(chosen, "chosen")?;
            parse_transcript(rejected, "rejected")?;
            // The prompt's turns: parse it with a placeholder answer, then remove that turn.
            let mut prompt = parse_transcript(&format!("{raw_prompt} x"), "chosen")?;
            if prompt.pop().map(|m| m.content) != Some("x".to_string()) {
                return Err(FieldError::new(
                    "chosen",
                    "the answers continue an assistant turn instead of answering a human turn",
                ));
            }
            Ok(Example::Pair(PreferencePair {
                prompt,
                chosen: chosen_answer,
                rejected: rejected_answer,
                rating: parse_rating(value)?,
                margin: parse_margin(value)?,
                raw_prompt: Some(raw_prompt),
            }))
        }
        Format::Preference => {
            let prompt = parse_prompt(value, "prompt")?;
            // An empty answer is one a model can give (EOS at once) and a reward model must rank.
            let chosen = string_field(value, "chosen")?;
            let rejected = string_field(value, "rejected")?;
            if chosen.trim() == rejected.trim() {
                return Err(FieldError::new("rejected", "identical to `chosen`"));
            }
            Ok(Example::Pair(PreferencePair {
                prompt,
                chosen: chosen.to_string(),
                rejected: rejected.to_string(),
                rating: parse_rating(value)?,
                margin: parse_margin(value)?,
                raw_prompt: None,
            }))
        }
        Format::Prompts => {
            let messages = if value.get("prompt").is_some() {
                parse_prompt(value, "prompt")?
            } else if let Some(list) = value.get("messages") {
                let messages = parse_messages(list, "messages")?;
                ends_with(&messages, Role::User, "messages")?;
                messages
            } else {
                return Err(FieldError::new("prompt", "missing (or give `messages`)"));
            };
            let category = optional_string(value, "category")?.map(str::to_string);
            Ok(Example::Prompt { messages, category })
        }
        Format::Text => Ok(Example::Text(non_empty(value, "text")?.to_string())),
        Format::PromptResponse => {
            let mut messages = parse_prompt(value, "prompt")?;
            // Empty when the model stopped at once: still an answer to score.
            messages.push(Message::new(
                Role::Assistant,
                string_field(value, "response")?,
            ));
            Ok(Example::Dialog(messages))
        }
    }
}
