//! Prompt files, read the same way by every method that samples (PPO, rejection sampling,
//! distillation, the safety evaluation): `prompts` records (`{"prompt"}` or `{"messages"}`
//! ending with a user turn, optional `category`), or an object with an `instructions` list of
//! strings (the Safety-Tuned LLaMAs evaluation sets), which [`RecordReader`] turns into
//! `{"prompt"}` records.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::format::{parse_record, Example, Format};
use crate::read::RecordReader;
use crate::Message;

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

/// Every prompt of a file; a malformed record is an error naming its file, line and field.
pub fn load_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    if !path.exists() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "prompt file not found".into(),
        });
    }
    let mut out = Vec::new();
    for record in RecordReader::open(path)? {
        let record = record?;
        match parse_record(Format::Prompts, &record.value) {
            Ok(Example::Prompt { messages, category }) => {
                out.push(PromptRecord { messages, category })
            }
            Ok(_) => {
                return Err(DataError::Record {
                    path: path.to_path_buf(),
                    line: record.line,
                    field: None,
                    message: "not a prompt".into(),
                })
            }
            Err(e) => {
                return Err(DataError::Record {
                    path: path.to_path_buf(),
                    line: record.line,
                    field: e.field,
                    message: e.message,
                })
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "no prompts".into(),
        });
    }
    Ok(out)
}
