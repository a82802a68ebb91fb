//! Reward models (Llama 2, section 3.2.2): the Llama trunk with a scalar head read at each
//! sequence's last real token, trained on preference pairs with
//! `-log σ(r_chosen - r_rejected - m(rating))`, evaluated by pairwise accuracy per rating bucket,
//! and used to score answers through one type, [`RewardModel`].

pub mod eval;
pub mod loss;
pub mod model;
pub mod score;
pub mod section;
pub mod train;

pub use eval::{PairEval, RewardStats};
pub use loss::{pair_loss, pair_margins};
pub use model::{reward_pad_id, RewardModel};
pub use section::{MarginKind, RewardSection};
