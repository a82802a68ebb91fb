//! Methods that sample answers from a model and judge them with a reward model (Llama 2,
//! sections 3.2.3 and 4.2): rejection sampling fine-tuning (`train rs`), targeted context
//! distillation (`train distill`), both built on one generate-then-fine-tune stage, and the
//! safety evaluation (`train eval safety`: refusal rates and the safety reward model's scores),
//! and the KL of a model's answers to a reference (`train eval kl`).

pub mod answers;
pub mod distill;
pub mod generate_then_sft;
pub mod kl_eval;
pub mod refusal;
pub mod rejection_sampling;
pub mod safety_eval;
