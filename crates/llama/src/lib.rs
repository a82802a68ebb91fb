//! The Llama 2 model in burn: architecture configs, the decoder, Hugging Face checkpoint import
//! and export, and KV-cached batched generation.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod host;
pub mod lora;
pub mod meta;
pub mod model;
pub mod reference;
pub mod shards;
pub mod weights;

pub use checkpoint::{
    init_random, init_random_with_head, load_pretrained, load_pretrained_as,
    load_pretrained_with_ids, save_pretrained, SaveDtype, SaveOptions,
};
pub use config::{load_config, LlamaConfig, RopeScaling};
pub use device::{host_memory_available, memory_available, parse_device};
pub use error::{LlamaError, Result};
pub use generate::{generate, Generated, SamplingParams};
pub use model::{AdapterDropout, Head, KvCache, Llama, Rope, Side, StepInput};
