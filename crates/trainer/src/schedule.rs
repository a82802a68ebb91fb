//! Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to a floor.

use crate::recipe::Schedule;

/// The learning rate at optimizer step `step` (0-based) of `total` steps. Warm-up rises
/// linearly from `peak / warmup` at the first step to `peak`; the decay then goes from `peak` to
/// `peak * min_ratio` at the last step.
pub fn learning_rate(
    schedule: Schedule,
    peak: f64,
    min_ratio: f64,
    warmup: usize,
    step: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let floor = peak * min_ratio;
    let decay_steps = total.saturating_sub(warmup).saturating_sub(1);
    let progress = if decay_steps == 0 {
        0.0
    } else {
        ((step - warmup) as f64 / decay_steps as f64).min(1.0)
    };
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => floor + (peak - floor) * (1.0 - progress),
        Schedule::Cosine => {
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Warm-up steps from the recipe's `warmup_steps` or `warmup_ratio` of `total`.
pub fn warmup_steps(steps: Option<usize>, ratio: Option<f64>, total: usize) -> usize {
    match (steps, ratio) {
        (Some(s), _) => s,
        (None, Some(r)) => (r * total as f64).round() as usize,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let lr = |step| learning_rate(Schedule::Cosine, 1.0, 0.1, 10, step, 111);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.55).abs() < 1e-12, "{}", lr(60));
        assert!((lr(110) - 0.1).abs() < 1e-12);
        for s in 10..110 {
            assert!(lr(s + 1) <= lr(s));
        }
    }

    #[test]
    fn linear_and_constant() {
        assert!((learning_rate(Schedule::Linear, 2.0, 0.0, 0, 0, 5) - 2.0).abs() < 1e-12);
        assert!((learning_rate(Schedule::Linear, 2.0, 0.0, 0, 2, 5) - 1.0).abs() < 1e-12);
        assert!((learning_rate(Schedule::Linear, 2.0, 0.0, 0, 4, 5)).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 3.0, 0.0, 0, 7, 9), 3.0);
        assert_eq!(warmup_steps(None, Some(0.03), 1000), 30);
        assert_eq!(warmup_steps(Some(5), None, 1000), 5);
    }
}
