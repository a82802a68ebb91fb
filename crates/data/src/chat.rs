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
/// the separating space becomes the first piece's prefix, exactly as in one joint encoding. An
/// empty answer is EOS alone, as a model that stops at once writes it.
pub fn encode_answer(tokenizer: &Tokenizer, answer: &str) -> Result<Vec<u32>> {
    if answer.trim().is_empty() {
        return Ok(vec![tokenizer.eos_id]);
    }
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

/// The Llama 2 chat format as a Jinja chat template for `tokenizer_config.json`, so that
/// `transformers`' `apply_chat_template` (and llama.cpp's chat mode) render dialogs as
/// [`render_dialog`] does. `answer_separator` is what goes between `[/INST]` and an answer: a
/// space for SentencePiece-style tokenizers (whose pieces carry the space; see
/// [`template_answer_separator`]).
pub fn chat_template(answer_separator: &str) -> String {
    let mut t = String::new();
    t.push_str("{%- if messages and messages[0]['role'] == 'system' -%}");
    t.push_str("{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}");
    t.push_str("{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}");
    t.push_str(
        "{%- if not turns -%}{{- raise_exception('Llama 2 chat: a dialog needs a user turn') -}}\
         {%- endif -%}",
    );
    t.push_str("{%- for message in turns -%}");
    t.push_str("{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}");
    t.push_str(
        "{%- if message['role'] != expected -%}{{- raise_exception('Llama 2 chat: after an \
         optional system message, turns alternate user, assistant, user, ...') -}}{%- endif -%}",
    );
    t.push_str("{%- if message['role'] == 'user' -%}{%- set text = message['content'] -%}");
    t.push_str("{%- if loop.first and system is not none -%}");
    t.push_str(r"{%- set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + text -%}");
    t.push_str("{%- endif -%}");
    t.push_str("{{- bos_token + '[INST] ' + text.strip() + ' [/INST]' -}}");
    t.push_str("{%- else -%}");
    t.push_str(&format!(
        "{{{{- '{answer_separator}' + message['content'].strip() + ' ' + eos_token -}}}}"
    ));
    t.push_str("{%- endif -%}{%- endfor -%}");
    t
}

/// The text [`chat_template`] renders for a dialog (our Rust rendition of it), with `<s>` and
/// `</s>` written out as the template writes them.
fn template_text(messages: &[Message], answer_separator: &str) -> String {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == Role::System => (Some(m.content.as_str()), &messages[1..]),
        _ => (None, messages),
    };
    let mut text = String::new();
    for (i, message) in turns.iter().enumerate() {
        if message.role == Role::User {
            let sys = if i == 0 { system } else { None };
            text.push_str("<s>");
            text.push_str(&user_text(sys, &message.content));
        } else {
            text.push_str(answer_separator);
            text.push_str(message.content.trim());
            text.push_str(" </s>");
        }
    }
    text
}

/// Dialogs the template is checked on: one turn, a system prompt, several turns, line breaks,
/// non-ASCII text and answers with spaces around them.
fn probe_dialogs() -> Vec<Vec<Message>> {
    use Role::*;
    let m = Message::new;
    vec![
        vec![m(User, "Hello there, how are you?")],
        vec![
            m(System, "You are helpful.\nBe brief."),
            m(User, " What is 2+2? "),
        ],
        vec![
            m(System, "Be safe."),
            m(User, "Hi"),
            m(Assistant, " Hello! How can I help? "),
            m(User, "Caf\u{e9}, 12.5% \u{2014} ok?"),
            m(Assistant, "Sure.\n\nDone."),
        ],
    ]
}

/// What the chat template must put between `[/INST]` and an answer for this tokenizer to give
/// exactly [`render_dialog`]'s ids from the rendered text: " " when the tokenizer's pieces
/// carry their leading space (Llama 2's SentencePiece), "" when they do not (byte-level BPE,
/// where our separately encoded answer has no space before it). `None` when neither works.
pub fn template_answer_separator(tokenizer: &Tokenizer) -> Result<Option<&'static str>> {
    'separators: for separator in [" ", ""] {
        for dialog in probe_dialogs() {
            let ours = render_dialog(tokenizer, &dialog)?.ids;
            let text = template_text(&dialog, separator);
            if tokenizer.encode_parsing_special_tokens(&text)? != ours {
                continue 'separators;
            }
        }
        return Ok(Some(separator));
    }
    Ok(None)
}

/// `tokenizer_config.json` and `special_tokens_map.json` for a model directory whose
/// `tokenizer.json` is `tokenizer`: the special tokens (the pad token by `pad_token_id`) and the
/// Llama 2 chat template, checked on probe dialogs to give [`render_dialog`]'s ids, over the
/// fields of `base` (the source's `tokenizer_config.json`, whose other settings are kept).
/// `None` when no template can (a tokenizer whose encoding depends on context in ways the
/// template cannot reproduce).
///
/// SentencePiece-style tokenizers are declared `LlamaTokenizer` with `legacy: true`: in
/// `transformers` 5.x, `legacy: false` gives the text after a `<s>` no leading space, which is
/// not how Meta's code encodes each turn.
pub fn hf_tokenizer_configs(
    tokenizer: &Tokenizer,
    model_max_length: usize,
    pad_token_id: Option<u32>,
    base: Option<serde_json::Value>,
) -> Result<Option<(serde_json::Value, serde_json::Value)>> {
    let Some(separator) = template_answer_separator(tokenizer)? else {
        return Ok(None);
    };
    let unk = tokenizer.token_id("<unk>").map(|_| "<unk>");
    let pad = pad_token_id.and_then(|id| tokenizer.id_to_token(id));
    let mut config = match base {
        Some(serde_json::Value::Object(map)) => serde_json::Value::Object(map),
        _ => serde_json::json!({}),
    };
    let ours = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "chat_template": chat_template(separator),
    });
    for (key, value) in ours.as_object().into_iter().flatten() {
        config[key] = value.clone();
    }
    if separator == " " {
        config["tokenizer_class"] = "LlamaTokenizer".into();
        config["legacy"] = true.into();
    } else {
        config["tokenizer_class"] = "PreTrainedTokenizerFast".into();
        if let Some(map) = config.as_object_mut() {
            map.remove("legacy");
        }
    }
    let mut special = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
    if let Some(unk) = unk {
        special["unk_token"] = unk.into();
    }
    if let Some(pad) = pad {
        special["pad_token"] = pad.into();
    }
    Ok(Some((config, special)))
}
