//! The spec's accuracy rule ("when is a result right?"), shared by the tests and `flashattn check`.
//!
//! A result is compared with the `f64` oracle computed from the same rounded inputs. For `f16`/`bf16` it
//! passes when `max|out - ref| <= factor * max|baseline - ref| + 1e-5`, where the baseline is the naive
//! algorithm in the input precision ([`crate::reference::naive_forward`]); `factor` is 2 for `o` (3 with
//! soft-capping or ALiBi) and 3 for gradients. `f32` results must match to `1e-4` relative (or within `factor`
//! times the f32 baseline's error when that is larger: large logits). `lse` must match to `1e-3` absolute
//! where finite ([`compare_lse_with_baseline`]: or within `factor` times the baseline's lse error) and be
//! `-inf` exactly where the reference is. FP8 (`e4m3`) inputs: the reference uses the dequantized inputs, the
//! baseline rounds the unnormalised probabilities to e4m3, and the bound is `factor * max|baseline - ref| +
//! 1e-3` ([`FP8_ABS`]).

use crate::dtype::DType;
use std::fmt;

/// The outcome of one comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// What was compared (`o`, `lse`, `dq`, ...).
    pub name: String,
    /// `max|out - ref|` (infinite when `out` has a NaN or an infinity where the reference is finite).
    pub max_err: f64,
    /// `max|baseline - ref|` (0 when no baseline applies).
    pub baseline_err: f64,
    /// The largest error allowed.
    pub bound: f64,
    /// Whether the result passes.
    pub pass: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<4} max err {:.3e} (baseline {:.3e}, bound {:.3e}) {}",
            self.name,
            self.max_err,
            self.baseline_err,
            self.bound,
            if self.pass { "ok" } else { "FAIL" }
        )
    }
}

fn max_err(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    out.iter().zip(reference).fold(0.0, |m, (&o, &r)| {
        let e = (o as f64 - r).abs();
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

/// The absolute term of the FP8 rule: `max|out - ref| <= 2 * max|baseline - ref| + FP8_ABS`.
pub const FP8_ABS: f64 = 1e-3;

/// Compares a tensor (`o`, `dq`, `dk`, `dv`) with the oracle under the spec's rule; `dtype` is the inputs'
/// (the problem's: [`DType::E4M3`] takes the FP8 rule).
pub fn compare(name: &str, out: &[f32], reference: &[f64], baseline: &[f32], dtype: DType, factor: f64) -> Verdict {
    let err = max_err(out, reference);
    let (base, bound) = if dtype == DType::F32 {
        // 1e-4 relative; with large logits the f32 rounding of the scores alone (which the naive f32
        // baseline shares) can exceed that, so the baseline's own error, times `factor`, is allowed too.
        let scale = reference.iter().fold(1f64, |m, r| m.max(r.abs()));
        let b = if baseline.is_empty() { 0.0 } else { max_err(baseline, reference) };
        (b, (1e-4 * scale).max(factor * b + 1e-5))
    } else if dtype.is_fp8() {
        let b = max_err(baseline, reference);
        (b, factor * b + FP8_ABS)
    } else {
        let b = max_err(baseline, reference);
        (b, factor * b + 1e-5)
    };
    Verdict { name: name.to_string(), max_err: err, baseline_err: base, bound, pass: err <= bound }
}

/// Compares log-sum-exps: `1e-3` absolute where finite, `-inf` exactly where the reference is `-inf`.
pub fn compare_lse(out: &[f32], reference: &[f64]) -> Verdict {
    let mut err = 0f64;
    let mut pass = out.len() == reference.len();
    for (&o, &r) in out.iter().zip(reference) {
        if r == f64::NEG_INFINITY {
            if o != f32::NEG_INFINITY {
                pass = false;
                err = f64::INFINITY;
            }
        } else {
            let e = (o as f64 - r).abs();
            if e.is_nan() || e > 1e-3 {
                pass = false;
            }
            err = if e.is_nan() { f64::INFINITY } else { err.max(e) };
        }
    }
    Verdict { name: "lse".into(), max_err: err, baseline_err: 0.0, bound: 1e-3, pass }
}

/// [`compare_lse`] with the bound widened to `factor` times the same-precision baseline's lse error when
/// that is larger than `1e-3`: the scores are `f32` in every backend, so at large logits (`|s|` in the
/// thousands) their rounding alone moves lse by more than `1e-3`, in the baseline as much as in the result.
pub fn compare_lse_with_baseline(out: &[f32], reference: &[f64], baseline: &[f32], factor: f64) -> Verdict {
    let mut v = compare_lse(out, reference);
    let b = compare_lse(baseline, reference).max_err;
    if b.is_finite() && factor * b > v.bound {
        v.bound = factor * b;
        v.pass = out.len() == reference.len()
            && out.iter().zip(reference).all(|(&o, &r)| {
                if r == f64::NEG_INFINITY {
                    o == f32::NEG_INFINITY
                } else {
                    (o as f64 - r).abs() <= v.bound
                }
            });
    }
    v.baseline_err = b;
    v
}

/// The factor for `o`: 2, or 3 when soft-capping or ALiBi is on.
pub fn o_factor(softcap: bool, alibi: bool) -> f64 {
    if softcap || alibi {
        3.0
    } else {
        2.0
    }
}

/// The factor for gradients.
pub const GRAD_FACTOR: f64 = 3.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_rejects_nan_and_large_errors() {
        let r = [1.0, 2.0];
        assert!(compare("o", &[1.0, 2.001], &r, &[1.0, 2.001], DType::F16, 2.0).pass);
        assert!(!compare("o", &[1.0, f32::NAN], &r, &[1.0, 2.001], DType::F16, 2.0).pass);
        assert!(!compare("o", &[1.0, 2.01], &r, &[1.0, 2.001], DType::F16, 2.0).pass);
        assert!(!compare("o", &[1.0, 2.001], &r, &[1.0, 2.0], DType::F32, 2.0).pass);
        assert!(compare_lse(&[f32::NEG_INFINITY, 0.5], &[f64::NEG_INFINITY, 0.5005]).pass);
        assert!(!compare_lse(&[0.0, 0.5], &[f64::NEG_INFINITY, 0.5]).pass);
        assert!(!compare_lse(&[f32::NEG_INFINITY, 0.6], &[f64::NEG_INFINITY, 0.5]).pass);
    }

    #[test]
    fn fp8_rule_adds_1e3() {
        let r = [1.0, 2.0];
        let base = [1.0, 2.01];
        assert!(compare("o", &[1.0, 2.0209], &r, &base, DType::E4M3, 2.0).pass);
        assert!(!compare("o", &[1.0, 2.0211], &r, &base, DType::E4M3, 2.0).pass);
        assert!(!compare("o", &[1.0, 2.0209], &r, &base, DType::BF16, 2.0).pass);
        assert!(!compare("o", &[f32::NAN, 2.0], &r, &base, DType::E4M3, 2.0).pass);
    }

    #[test]
    fn large_logits_are_judged_against_the_baseline() {
        // lse in the thousands: the baseline is off by 7e-3 as well, so 7e-3 passes; 3e-2 does not.
        let r = [8000.0, f64::NEG_INFINITY];
        let base = [8000.007f32, f32::NEG_INFINITY];
        assert!(!compare_lse(&[8000.007, f32::NEG_INFINITY], &r).pass);
        assert!(compare_lse_with_baseline(&[8000.007, f32::NEG_INFINITY], &r, &base, 2.0).pass);
        assert!(!compare_lse_with_baseline(&[8000.03, f32::NEG_INFINITY], &r, &base, 2.0).pass);
        assert!(!compare_lse_with_baseline(&[8000.0, 1.0], &r, &base, 2.0).pass);
        assert!(!compare_lse_with_baseline(&[f32::NAN, f32::NEG_INFINITY], &r, &base, 2.0).pass);
        // A clean baseline keeps the 1e-3 bound.
        assert!(!compare_lse_with_baseline(&[0.502], &[0.5], &[0.5], 2.0).pass);
        // f32: a baseline error above 1e-4 relative widens the bound to factor x that error.
        assert!(compare("o", &[1.0005], &[1.0], &[1.0004], DType::F32, 2.0).pass);
        assert!(!compare("o", &[1.0005], &[1.0], &[1.0], DType::F32, 2.0).pass);
    }
}
