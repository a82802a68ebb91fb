//! Reward models (Llama 2, section 3.2.2): the Llama trunk with a scalar head read at each
//! sequence's last real token, trained on preference pairs with
//! `-log σ(r_chosen - r_rejected - m(rating))`, evaluated by pairwise accuracy per rating bucket.

pub mod eval;
pub mod loss;
pub mod score;
pub mod train;

pub use eval::{PairEval, RewardStats};
pub use loss::{pair_loss, pair_margins};
