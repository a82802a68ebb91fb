//! The data pipeline: reading instruction, chat, preference, prompt and text data, the Llama 2
//! chat template with loss masks by token position, the length policy, packing, mixtures, and
//! batches.

pub mod batch;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod format;
pub mod inspect;
pub mod prompts;
pub mod read;
pub mod render;
pub mod sentencepiece;
pub mod tokenizer;

pub use chat::{render_dialog, render_prompt, Message, Rendered, Role};
pub use dataset::{
    load_data, load_source, DataConfig, Item, LoadedData, OnError, SourceConfig, SourceStats,
};
pub use error::{DataError, Result};
pub use format::{Example, Format, PreferencePair, Rating};
pub use prompts::{load_prompts, PromptRecord};
pub use render::{tokenize_example, LengthPolicy, Tokenized, Truncation};
pub use tokenizer::Tokenizer;
