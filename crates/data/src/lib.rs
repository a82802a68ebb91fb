//! The data pipeline: tokenizer and the Llama 2 chat template (datasets and batching follow).

pub mod chat;
pub mod error;
pub mod tokenizer;

pub use chat::{render_dialog, render_prompt, Message, Rendered, Role};
pub use error::{DataError, Result};
pub use tokenizer::Tokenizer;
