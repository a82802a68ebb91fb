//! Direct preference optimisation (Rafailov et al., 2023) and its variants on the preference
//! pairs `train reward` reads: the policy is trained so that its log-probability ratio to a
//! frozen reference separates the chosen from the rejected answer, with no reward model and no
//! sampling.
//!
//! `loss.rs` holds the formulas (sigmoid/cDPO, IPO, robust DPO) and their derivatives as plain
//! functions; `logps.rs` the sequence log-probabilities over answer tokens and their gradients
//! through the chunked language-model head; `train.rs` the run.

pub mod logps;
pub mod loss;
pub mod section;
pub mod train;

pub use loss::{pair_loss, PairLoss, PairMetrics};
pub use section::{DpoLoss, DpoSection};
