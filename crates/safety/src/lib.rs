//! The safety side of Llama 2 (section 4.2) on top of the trainers: evaluating a model's answers
//! to safety and benign prompt sets (refusal rate, false refusals, safety reward), rejection
//! sampling fine-tuning, and targeted context distillation.

pub mod answers;
pub mod distill;
pub mod eval;
pub mod prompts;
pub mod refusal;
pub mod rs;
