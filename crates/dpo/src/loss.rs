//! The preference losses as plain functions of one pair's sequence log-probabilities, with
//! their derivatives, tested against hand-computed numbers.
//!
//! With `π` the policy's and `ρ` the reference's log-probabilities of the chosen (`c`) and
//! rejected (`r`) answers, `h = (π_c - ρ_c) - (π_r - ρ_r)`:
//! - sigmoid (DPO; cDPO with ε > 0): `-(1 - ε) log σ(β h) - ε log σ(-β h)`
//! - robust (Chowdhury et al., 2024): `(-(1 - ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)`
//! - ipo (Azar et al., 2023): `(h - 1/(2β))²`, on log-probabilities averaged over the answer's
//!   tokens (as TRL computes it); the others use sums.
//!
//! The implicit rewards are `β (π - ρ)` of each answer.

use crate::section::DpoLoss;

/// One pair's loss and its derivatives with respect to the policy's log-probabilities of the
/// chosen and rejected answers (in the form the loss uses: sums, or averages for IPO).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
}

/// `log σ(x)`, without overflow for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The loss of one pair: `policy` and `reference` are `[chosen, rejected]` log-probabilities
/// (sums over answer tokens; for IPO, averages), `eps` the label smoothing.
pub fn pair_loss(
    kind: DpoLoss,
    beta: f64,
    eps: f64,
    policy: [f64; 2],
    reference: [f64; 2],
) -> PairLoss {
    let h = (policy[0] - reference[0]) - (policy[1] - reference[1]);
    let x = beta * h;
    let (loss, d_h) = match kind {
        DpoLoss::Sigmoid => (
            -(1.0 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x),
            -beta * (1.0 - eps) * sigmoid(-x) + beta * eps * sigmoid(x),
        ),
        DpoLoss::Robust => (
            (-(1.0 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1.0 - 2.0 * eps),
            -beta * ((1.0 - eps) * sigmoid(-x) + eps * sigmoid(x)) / (1.0 - 2.0 * eps),
        ),
        DpoLoss::Ipo => {
            let gap = h - 1.0 / (2.0 * beta);
            (gap * gap, 2.0 * gap)
        }
    };
    PairLoss {
        loss,
        d_chosen: d_h,
        d_rejected: -d_h,
    }
}

/// A sequence log-probability as the loss uses it: the sum over the answer's `tokens` tokens,
/// or for IPO their average.
pub fn as_used(kind: DpoLoss, sum: f64, tokens: usize) -> f64 {
    match kind {
        DpoLoss::Ipo => sum / tokens.max(1) as f64,
        _ => sum,
    }
}

/// The metrics of a set of pairs, as other tools name them: the mean loss, implicit rewards
/// `β (π - ρ)` of each answer, their margin, the share of pairs whose chosen answer has the
/// higher reward, and the policy's log-probabilities (as the loss uses them).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairMetrics {
    pairs: usize,
    loss: f64,
    chosen: f64,
    rejected: f64,
    right: f64,
    logp_chosen: f64,
    logp_rejected: f64,
}

impl PairMetrics {
    /// Adds a pair with its loss.
    pub fn add(&mut self, beta: f64, policy: [f64; 2], reference: [f64; 2], loss: f64) {
        let chosen = beta * (policy[0] - reference[0]);
        let rejected = beta * (policy[1] - reference[1]);
        self.pairs += 1;
        self.loss += loss;
        self.chosen += chosen;
        self.rejected += rejected;
        self.right += f64::from(u8::from(chosen > rejected));
        self.logp_chosen += policy[0];
        self.logp_rejected += policy[1];
    }

    pub fn pairs(&self) -> usize {
        self.pairs
    }

    pub fn loss(&self) -> f64 {
        self.loss / self.pairs.max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        self.right / self.pairs.max(1) as f64
    }

    /// `(name, mean)` of every metric, names prefixed with `prefix` (`""`, `"eval_"`).
    pub fn values(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.pairs.max(1) as f64;
        [
            ("loss", self.loss),
            ("rewards/chosen", self.chosen),
            ("rewards/rejected", self.rejected),
            ("rewards/margins", self.chosen - self.rejected),
            ("rewards/accuracies", self.right),
            ("logps/chosen", self.logp_chosen),
            ("logps/rejected", self.logp_rejected),
        ]
        .into_iter()
        .map(|(name, sum)| (format!("{prefix}{name}"), sum / n))
        .collect()
    }
}
