//! RLHF with PPO as in Llama 2 (section 3.2.3): a policy samples answers to prompts with the KV
//! cache, reward models score them (the safety/helpfulness rule, logit, whitening), a per-token
//! KL penalty holds the policy near a frozen reference, and clipped PPO updates the policy and a
//! value model from GAE advantages.

pub mod algo;
pub mod rollout;
pub mod train;
