//! RLHF with PPO as in Llama 2 (section 3.2.3): a policy samples answers to prompts with the KV
//! cache, reward models score them (the safety/helpfulness rule, logit, whitening), a per-token
//! KL penalty holds the policy near a frozen reference, and clipped PPO updates the policy and a
//! value model from GAE advantages.
//!
//! `train.rs` sets a run up and loops; `iteration.rs` is one iteration (rollout → score →
//! advantages → update → report); `rollout.rs` lays rollouts out as batches; `algo.rs` holds the
//! arithmetic (reward rule and shaping, KL, GAE, clipped losses); `update.rs` the PPO update.

pub mod algo;
pub mod bench;
pub mod iteration;
pub mod rollout;
pub mod section;
pub mod train;
pub mod update;

pub use iteration::{IterationReport, Models, Ppo, Prompt};
pub use section::PpoSection;
