//! `[dpo]`: the preference loss, its β, and where the reference log-probabilities come from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which preference loss `train dpo` minimises (see `loss.rs` for the formulas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// DPO's `-log σ(β h)`; with `label_smoothing` ε > 0, conservative DPO (cDPO).
    #[default]
    Sigmoid,
    /// IPO (Azar et al., 2023): `(h - 1/(2β))²` on log-probabilities averaged over answer tokens.
    Ipo,
    /// Robust DPO (Chowdhury et al., 2024): the unbiased loss under label noise of rate ε.
    Robust,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// Strength of the pull toward the reference (DPO's β; IPO's τ).
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub loss: DpoLoss,
    /// The assumed share of flipped labels ε, for `sigmoid` (cDPO) and `robust`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// The reference model's directory; by default the starting model (with LoRA: its base,
    /// adapters left out).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// Compute the reference log-probabilities of every pair once before training, keep them
    /// with the run (`reference_logps.json`) and free the reference model.
    #[serde(default)]
    pub precompute_reference: bool,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoSection {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            loss: DpoLoss::default(),
            label_smoothing: 0.0,
            reference: None,
            precompute_reference: false,
        }
    }
}

impl trainer::Section for DpoSection {
    const NAME: &'static str = "dpo";

    fn resolve_paths(&mut self, resolve: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(path) = &mut self.reference {
            resolve(path);
        }
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!("[dpo] `beta` must be positive, not {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "[dpo] `label_smoothing` must be in [0, 0.5), not {}",
                self.label_smoothing
            ));
        }
        if self.loss == DpoLoss::Ipo && self.label_smoothing > 0.0 {
            return Err(
                "[dpo] `label_smoothing` applies to loss = \"sigmoid\" and \"robust\", not \"ipo\""
                    .into(),
            );
        }
        Ok(())
    }
}
