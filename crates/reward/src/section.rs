//! `[reward]`: how the reward-model loss treats ratings, and reward centering.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a reward model turns a pair's rating into the margin of its loss (Llama 2, Table 27).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarginKind {
    /// No margin, even for pairs with a numeric `margin`.
    None,
    /// 1, 2/3, 1/3, 0 from "significantly better" down to "negligibly better / unsure".
    #[default]
    Small,
    /// 3, 2, 1, 0.
    Large,
    /// `margin_table` in the recipe.
    Custom,
}

/// `[reward]`: the reward-model loss. Pairs without a rating use their numeric `margin`, or 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    #[serde(default)]
    pub margin: MarginKind,
    /// For `margin = "custom"`: the margin of each rating, keyed `significantly_better`,
    /// `better`, `slightly_better`, `negligibly_better`.
    #[serde(default)]
    pub margin_table: Option<BTreeMap<String, f64>>,
    /// Reward centering: adds `centering * mean((r_chosen + r_rejected)^2)` to the loss, which
    /// keeps scores near zero without changing their differences. 0 turns it off.
    #[serde(default)]
    pub centering: f64,
}

/// Names of the rating levels as `margin_table` keys, strongest first.
pub const MARGIN_KEYS: [&str; 4] = [
    "significantly_better",
    "better",
    "slightly_better",
    "negligibly_better",
];

impl RewardSection {
    /// The margin of each rating level, strongest first.
    pub fn margins(&self) -> [f64; 4] {
        match self.margin {
            MarginKind::None => [0.0; 4],
            MarginKind::Small => [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0],
            MarginKind::Large => [3.0, 2.0, 1.0, 0.0],
            MarginKind::Custom => {
                let table = self.margin_table.clone().unwrap_or_default();
                MARGIN_KEYS.map(|k| table.get(k).copied().unwrap_or(0.0))
            }
        }
    }
}

impl trainer::Section for RewardSection {
    const NAME: &'static str = "reward";

    fn validate(&self) -> Result<(), String> {
        match (&self.margin, &self.margin_table) {
            (MarginKind::Custom, None) => {
                return Err("[reward] `margin = \"custom\"` needs a `margin_table`".into())
            }
            (MarginKind::Custom, Some(table)) => {
                for (key, value) in table {
                    if !MARGIN_KEYS.contains(&key.as_str()) {
                        return Err(format!(
                            "[reward] margin_table: unknown rating `{key}` (expected {})",
                            MARGIN_KEYS.join(", ")
                        ));
                    }
                    if !value.is_finite() {
                        return Err(format!("[reward] margin_table.{key} must be a number"));
                    }
                }
            }
            (_, Some(_)) => {
                return Err(
                    "[reward] `margin_table` is only read with `margin = \"custom\"`".into(),
                )
            }
            _ => {}
        }
        if !(self.centering >= 0.0 && self.centering.is_finite()) {
            return Err("[reward] `centering` must be >= 0".into());
        }
        Ok(())
    }
}
