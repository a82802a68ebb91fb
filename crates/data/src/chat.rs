//! The Llama 2 chat format, assembled from token ids:
//!
//! `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]`
//!
//! `<s>`/`</s>` are inserted as ids, never tokenized from text. Every segment is tokenized on its
//! own, so which tokens belong to an answer is known by position, not by searching for strings.

use crate::error::{DataError, Result};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Token ids of a rendered dialog, with `trained[i]` true for answer tokens (and their EOS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Rendered {
    fn push(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.trained.extend(std::iter::repeat_n(trained, ids.len()));
    }
}

const B_INST: &str = "[INST]";
const E_INST: &str = "[/INST]";

/// Text of one user turn, with the system block folded into the first, as Meta's reference
/// code does.
fn user_text(system: Option<&str>, user: &str) -> String {
    let content = match system {
        Some(system) => format!("<<SYS>>\n{system}\n<</SYS>>\n\n{user}"),
        None => user.to_string(),
    };
    format!("{B_INST} {} {E_INST}", content.trim())
}

/// Renders a dialog: an optional system message, then user and assistant turns alternating,
/// starting with the user. A dialog that ends with a user turn ends with an open `[/INST]`,
/// ready for generation; every assistant turn is marked as trained.
pub fn render_dialog(tokenizer: &Tokenizer, messages: &[Message]) -> Result<Rendered> {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == Role::System => (Some(m.content.as_str()), &messages[1..]),
        _ => (None, messages),
    };
    if turns.is_empty() {
        return Err(DataError::Dialog(
            "a dialog needs at least one user turn".into(),
        ));
    }
    let mut out = Rendered::default();
    for (i, pair) in turns.chunks(2).enumerate() {
        let user = &pair[0];
        if user.role != Role::User {
            return Err(DataError::Dialog(format!(
                "turn {} should be from the user, found {:?}",
                2 * i + 1,
                user.role
            )));
        }
        let sys = if i == 0 { system } else { None };
        out.push(&[tokenizer.bos_id], false);
        out.push(&tokenizer.encode(&user_text(sys, &user.content))?, false);
        if let Some(answer) = pair.get(1) {
            if answer.role != Role::Assistant {
                return Err(DataError::Dialog(format!(
                    "turn {} should be from the assistant, found {:?}",
                    2 * i + 2,
                    answer.role
                )));
            }
            out.push(&encode_answer(tokenizer, &answer.content)?, true);
        }
    }
    Ok(out)
}

/// An assistant answer as it follows "[/INST]": " {answer} " then EOS. Tokenized on its own,
/// the separating space becomes the first piece's prefix, exactly as in one joint encoding.
pub fn encode_answer(tokenizer: &Tokenizer, answer: &str) -> Result<Vec<u32>> {
    let mut ids = tokenizer.encode(&format!("{} ", answer.trim()))?;
    ids.push(tokenizer.eos_id);
    Ok(ids)
}

/// A single-turn chat prompt ready for generation.
pub fn render_prompt(tokenizer: &Tokenizer, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = system {
        messages.push(Message::new(Role::System, system));
    }
    messages.push(Message::new(Role::User, user));
    Ok(render_dialog(tokenizer, &messages)?.ids)
}
