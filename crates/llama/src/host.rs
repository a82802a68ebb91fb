//! Softmax passes run on the host for flex, outside any autodiff graph.
//!
//! burn-flex 0.22.1's softmax is fused and parallel over rows but calls the scalar `expf` once
//! per element, and the code around it (masking, the log-sum-exp, picking targets, subtracting
//! the one-hot) is one single-core pass each. On flex these functions take the buffers and do
//! each row in one parallel pass, the exponentials eight at a time (a polynomial the compiler
//! vectorises, AVX2 where the CPU has it; within 2 ulp of `expf`). Other backends keep burn's
//! operations.

use burn::prelude::*;
use burn::tensor::TensorData;
use rayon::prelude::*;

/// Whether these passes serve `device` (flex, with or without autodiff).
pub fn serves(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// Rows handed to one parallel task at a time: about 64 KiB of scores.
fn rows_per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

/// `exp(row[i] - shift)` into `out[i]` (0 where `keep[i]` is false), returning their sum.
fn exp_row(row: &[f32], keep: Option<&[bool]>, shift: f32, out: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { exp_row_avx2(row, keep, shift, out) };
    }
    exp_row_portable(row, keep, shift, out)
}

/// [`exp_row_portable`] compiled for AVX2 and FMA (eight lanes), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_row_avx2(row: &[f32], keep: Option<&[bool]>, shift: f32, out: &mut [f32]) -> f32 {
    exp_row_portable(row, keep, shift, out)
}

/// Eight independent lanes, so the compiler vectorises the exponentials and the sum.
#[inline(always)]
fn exp_row_portable(row: &[f32], keep: Option<&[bool]>, shift: f32, out: &mut [f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let whole = row.len() / 8 * 8;
    for (input, output) in row[..whole]
        .chunks_exact(8)
        .zip(out[..whole].chunks_exact_mut(8))
    {
        for lane in 0..8 {
            output[lane] = exp(input[lane] - shift);
            sums[lane] += output[lane];
        }
    }
    for (lane, (&x, y)) in row[whole..].iter().zip(&mut out[whole..]).enumerate() {
        *y = exp(x - shift);
        sums[lane] += *y;
    }
    if let Some(keep) = keep {
        // Masked slots (set to -inf by the caller: a tiny term here) count for nothing.
        for (i, (y, _)) in out
            .iter_mut()
            .zip(keep)
            .enumerate()
            .filter(|(_, (_, k))| !**k)
        {
            sums[i % 8] -= *y;
            *y = 0.0;
        }
    }
    sums.iter().sum()
}

/// `e^x` for `x <= 0` (and NaN, which stays NaN), within 2 ulp: `x = n·ln 2 + r` with
/// `|r| <= ln 2 / 2`, `e^r` by its Taylor series to `r^7` (the next term is below 6e-9 of it),
/// times `2^n` built in the exponent bits. Below -87.3365, where `e^x` leaves the normal floats,
/// it gives the smallest normal float (1.2e-38): nothing next to the row's largest term, `e^0 = 1`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n * LN2_HI` is exact for the n used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.336_54 { -87.336_54 } else { x };
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    // The integer n sits in the low bits of `shifted`: read it there (integer lanes; a
    // float-to-int cast would be scalar, for its NaN and overflow rules).
    let k = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let scale = f32::from_bits((k.wrapping_add(127) as u32) << 23);
    p * scale
}

fn row_max(row: &[f32]) -> f32 {
    row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// Softmax over the last axis of `scores` (`[b, h, q, k]`, f32, no autodiff) where `masked`
/// (`[b, 1, q, k]`, true: may not look; another shape is a caller's bug) is false; masked slots
/// get 0, and a row with every slot masked is all 0.
pub fn masked_softmax(scores: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
    let device = scores.device();
    let [batch, heads, queries, keys] = scores.dims();
    assert_eq!(
        masked.dims(),
        [batch, 1, queries, keys],
        "one mask row per query, shared by the heads"
    );
    if batch * heads * queries * keys == 0 {
        return scores;
    }
    let mut data = scores.into_data().convert::<f32>();
    let keep: Vec<bool> = masked.into_data().iter::<bool>().map(|m| !m).collect();
    let Ok(values) = data.as_mut_slice::<f32>() else {
        unreachable!("f32 scores read back as f32");
    };
    let per_task = rows_per_task(keys);
    values
        .par_chunks_mut(per_task * keys)
        .enumerate()
        .for_each(|(task, rows)| {
            let mut scratch = vec![0.0f32; keys];
            for (offset, row) in rows.chunks_mut(keys).enumerate() {
                // Row (b, h, q) of the scores reads row (b, q) of the mask.
                let index = task * per_task + offset;
                let (b, q) = (index / (heads * queries), index % queries);
                let keep = &keep[(b * queries + q) * keys..][..keys];
                for (x, _) in row.iter_mut().zip(keep).filter(|(_, k)| !**k) {
                    *x = f32::NEG_INFINITY;
                }
                let max = row_max(row);
                if max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let sum = exp_row(row, Some(keep), max, &mut scratch);
                let scale = 1.0 / sum;
                for (x, e) in row.iter_mut().zip(&scratch) {
                    *x = e * scale;
                }
            }
        });
    Tensor::from_data(data, &device)
}

/// For logits `[n, vocab]` (f32, no autodiff) and one target id per row: the target's
/// log-probability (`[n]`), and, when `residual` is asked for, `softmax - one_hot(target)`
/// (`[n, vocab]`, the log-softmax's gradient with its sign flipped). A target outside the
/// vocabulary gives NaN, its residual row too (the callers check ids before).
pub fn target_log_softmax(
    logits: Tensor<2>,
    targets: &[i64],
    residual: bool,
) -> (Tensor<1>, Option<Tensor<2>>) {
    let device = logits.device();
    let [rows, vocab] = logits.dims();
    assert_eq!(targets.len(), rows, "one target per row");
    if rows * vocab == 0 {
        let picked = Tensor::<1>::full([rows], f32::NAN, &device);
        return (picked, residual.then_some(logits));
    }
    let mut data = logits.into_data().convert::<f32>();
    let Ok(values) = data.as_mut_slice::<f32>() else {
        unreachable!("f32 logits read back as f32");
    };
    let per_task = rows_per_task(vocab);
    let mut picked = vec![0.0f32; rows];
    values
        .par_chunks_mut(per_task * vocab)
        .zip(picked.par_chunks_mut(per_task))
        .zip(targets.par_chunks(per_task))
        .for_each(|((rows, picked), targets)| {
            let mut scratch = vec![0.0f32; vocab];
            for ((row, picked), &target) in rows.chunks_mut(vocab).zip(picked).zip(targets) {
                let max = row_max(row);
                let sum = exp_row(row, None, max, &mut scratch);
                let log_sum_exp = max + sum.ln();
                let at = usize::try_from(target).ok().filter(|&t| t < vocab);
                *picked = at.map_or(f32::NAN, |t| row[t] - log_sum_exp);
                if residual {
                    let scale = 1.0 / sum;
                    for (x, e) in row.iter_mut().zip(&scratch) {
                        *x = e * scale;
                    }
                    match at {
                        Some(t) => row[t] -= 1.0,
                        // No gradient from a value that is not a number.
                        None => row.fill(f32::NAN),
                    }
                }
            }
        });
    let picked = Tensor::from_data(TensorData::new(picked, [rows]), &device);
    let residual = residual.then(|| Tensor::from_data(data, &device));
    (picked, residual)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of the standard library's `exp` from 0 down past underflow's edge (-90),
    /// NaN kept, and the sum of a row that of its terms (the dispatched path, AVX2 where the CPU
    /// has it, and the portable one).
    #[test]
    fn the_vectorised_exponential_matches_the_standard_one() {
        let inputs: Vec<f32> = (0..21_000).map(|i| -(i as f32) * 0.0043).collect();
        for avx2 in [true, false] {
            let mut out = vec![0.0f32; inputs.len()];
            let sum = if avx2 {
                exp_row(&inputs, None, 0.0, &mut out)
            } else {
                exp_row_portable(&inputs, None, 0.0, &mut out)
            };
            for (&x, &y) in inputs.iter().zip(&out) {
                let want = x.exp();
                if want < f32::MIN_POSITIVE {
                    assert!(y <= 2e-38, "{x}: {y}");
                    continue;
                }
                let ulps = (y.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulps <= 2, "e^{x}: {y} against {want} ({ulps} ulp)");
            }
            let direct: f64 = out.iter().map(|&y| y as f64).sum();
            assert!(
                (sum as f64 - direct).abs() <= 1e-5 * direct,
                "{sum} vs {direct}"
            );
        }
        let mut out = [0.0f32; 3];
        exp_row(&[0.0, f32::NAN, -1.0], None, 0.0, &mut out);
        assert!(out[1].is_nan() && out[0] == 1.0);
    }

    fn max_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Over many parallel tasks (rows split across them, queries fewer than keys as with a KV
    /// cache), the masked softmax is burn's softmax of the masked scores.
    #[test]
    fn the_masked_softmax_is_burns_across_tasks() {
        use burn::tensor::activation::softmax;
        use burn::tensor::Distribution;
        let device = Device::flex();
        let [b, h, q, k] = [2, 3, 700, 9];
        let scores = Tensor::<4>::random([b, h, q, k], Distribution::Normal(0.0, 4.0), &device);
        // Each row keeps its last key and a pattern of the others.
        let masked: Vec<bool> = (0..b * q * k)
            .map(|i| i % k != k - 1 && (i / k + i % k) % 3 == 0)
            .collect();
        let masked = Tensor::<4, Bool>::from_data(TensorData::new(masked, [b, 1, q, k]), &device);
        let want = softmax(
            scores.clone().mask_fill(masked.clone(), f32::NEG_INFINITY),
            3,
        );
        let got = masked_softmax(scores, masked);
        let (want, got) = (crate::model::to_host(want), crate::model::to_host(got));
        assert!(max_difference(&want, &got) < 1e-6);
    }

    /// The targets' log-softmax and softmax minus one-hot, rows spread over tasks, against the
    /// same computed in f64 (burn-flex's f32 softmax sums 20,000 terms one after another, so
    /// it is itself a few 1e-6 off).
    #[test]
    fn the_targets_log_softmax_is_exact_to_f32_rounding_across_tasks() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let [rows, vocab] = [5, 20_000];
        let logits = Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 5.0), &device);
        let host = crate::model::to_host(logits.clone());
        let targets: Vec<i64> = (0..rows as i64).map(|r| r * 3_907 + 11).collect();
        let (picked, residual) = target_log_softmax(logits, &targets, true);
        let (picked, residual) = (
            crate::model::to_host(picked),
            crate::model::to_host(residual.expect("asked for")),
        );
        for (r, &t) in targets.iter().enumerate() {
            let row = &host[r * vocab..][..vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let log_sum_exp = max + sum.ln();
            let want = row[t as usize] as f64 - log_sum_exp;
            assert!(
                (picked[r] as f64 - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                picked[r]
            );
            for (i, &x) in row.iter().enumerate() {
                let p = (x as f64 - log_sum_exp).exp() - if i == t as usize { 1.0 } else { 0.0 };
                let got = residual[r * vocab + i] as f64;
                assert!(
                    (got - p).abs() <= 1e-5 * p.abs().max(1e-3),
                    "row {r}, {i}: {got} vs {p}"
                );
            }
        }
    }

    #[test]
    fn masked_slots_get_nothing_and_a_fully_masked_row_is_zero() {
        let device = Device::flex();
        let scores = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 1, 2, 3]),
            &device,
        );
        let masked = Tensor::<4, Bool>::from_data(
            TensorData::new(vec![false, true, false, true, true, true], [1, 1, 2, 3]),
            &device,
        );
        let probs = crate::model::to_host(masked_softmax(scores, masked));
        let (a, c) = (1.0f32.exp(), 3.0f32.exp());
        let want = [a / (a + c), 0.0, c / (a + c), 0.0, 0.0, 0.0];
        for (p, w) in probs.iter().zip(want) {
            assert!((p - w).abs() < 1e-6, "{probs:?}");
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_gives_nan_not_a_panic() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data(
            TensorData::new(vec![0.5f32, 1.5, -2.0, 0.0], [2, 2]),
            &device,
        );
        let (picked, residual) = target_log_softmax(logits, &[1, 7], true);
        let picked = crate::model::to_host(picked);
        let lse = (0.5f32.exp() + 1.5f32.exp()).ln();
        assert!((picked[0] - (1.5 - lse)).abs() < 1e-6 && picked[1].is_nan());
        let residual = crate::model::to_host(residual.expect("asked for"));
        assert!((residual[0] - (0.5 - lse).exp()).abs() < 1e-6);
        assert!((residual[1] - ((1.5 - lse).exp() - 1.0)).abs() < 1e-6);
        assert!(residual[2].is_nan() && residual[3].is_nan());
    }
}
