//! Prompt sets: the Safety-Tuned LLaMAs evaluation files (`{"instructions": [...]}`) or any file
//! of `prompts` records (`{"prompt"}` or `{"messages"}`, optional `category`).

use std::path::Path;

use data::format::{parse_record, Format};
use data::read::RecordReader;
use data::{DataError, Message, Role};
use trainer::run::{io_err, Result, TrainError};

/// A prompt as messages (ending with a user turn) and its category.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    pub messages: Vec<Message>,
    pub category: Option<String>,
}

impl PromptRecord {
    /// The last user turn, for reports.
    pub fn text(&self) -> &str {
        self.messages.last().map_or("", |m| m.content.as_str())
    }
}

/// Reads a prompt set. A JSON object with an `instructions` list of strings is one prompt per
/// string; anything else is read as `prompts` records (JSON Lines or a JSON array).
pub fn load_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    if !path.exists() {
        return Err(TrainError::Invalid(format!(
            "{}: prompt file not found",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    if let Ok(serde_json::Value::Object(object)) = serde_json::from_str(&text) {
        if let Some(list) = object.get("instructions").and_then(|v| v.as_array()) {
            return list
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some(s) if !s.trim().is_empty() => Ok(PromptRecord {
                        messages: vec![Message::new(Role::User, s.trim())],
                        category: None,
                    }),
                    _ => Err(TrainError::Invalid(format!(
                        "{}: instructions[{i}] must be a non-empty string",
                        path.display()
                    ))),
                })
                .collect();
        }
    }
    let mut out = Vec::new();
    for record in RecordReader::open(path)? {
        let record = record?;
        match parse_record(Format::Prompts, &record.value) {
            Ok(data::Example::Prompt { messages, category }) => {
                out.push(PromptRecord { messages, category })
            }
            Ok(_) => unreachable!("the prompts format parses to prompts"),
            Err(e) => {
                return Err(DataError::Record {
                    path: path.to_path_buf(),
                    line: record.line,
                    field: e.field,
                    message: e.message,
                }
                .into())
            }
        }
    }
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: no prompts",
            path.display()
        )));
    }
    Ok(out)
}
