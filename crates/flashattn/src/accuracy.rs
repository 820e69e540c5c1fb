//! The spec's accuracy rule ("when is a result right?"), shared by the tests and `flashattn check`.
//!
//! A result is compared with the `f64` oracle computed from the same rounded inputs. For `f16`/`bf16` it
//! passes when `max|out - ref| <= factor * max|baseline - ref| + 1e-5`, where the baseline is the naive
//! algorithm in the input precision ([`crate::reference::naive_forward`]); `factor` is 2 for `o` (3 with
//! soft-capping or ALiBi) and 3 for gradients. `f32` results must match to `1e-4` relative. `lse` must match
//! to `1e-3` absolute where finite and be `-inf` exactly where the reference is.

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

/// Compares a tensor (`o`, `dq`, `dk`, `dv`) with the oracle under the spec's rule.
pub fn compare(name: &str, out: &[f32], reference: &[f64], baseline: &[f32], dtype: DType, factor: f64) -> Verdict {
    let err = max_err(out, reference);
    let (base, bound) = if dtype == DType::F32 {
        let scale = reference.iter().fold(1f64, |m, r| m.max(r.abs()));
        (0.0, 1e-4 * scale)
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
}
