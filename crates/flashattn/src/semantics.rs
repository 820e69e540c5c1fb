//! The definitions every backend shares: visibility (causal and sliding-window masks), ALiBi, soft-capping
//! and the grouped-head mapping. `../kernels/mask.cuh` is the device-side twin of this file; the spec is
//! `docs/spec/ATTENTION.md` ("Scores", "Visibility", "Grouped heads").

use crate::error::{Error, Result};
use std::ops::Range;

/// Which keys a query row sees. All masks are aligned to the bottom-right corner: with `off = sk - sq`,
/// key `j` is visible to query `i` when `j < sk` and `i + off - left <= j <= i + off + right`
/// (`None` = unbounded side). Causal is `left = None, right = Some(0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask {
    /// Keys visible to the left of the diagonal; `None` = all.
    pub left: Option<usize>,
    /// Keys visible to the right of the diagonal; `None` = all.
    pub right: Option<usize>,
}

impl Mask {
    /// No mask: every key `j < sk` is visible.
    pub const NONE: Mask = Mask { left: None, right: None };
    /// The causal mask.
    pub const CAUSAL: Mask = Mask { left: None, right: Some(0) };

    /// Resolves the user's `causal` flag and `window` into a mask. `-1` means unbounded; any other negative
    /// value is an error. Causal together with a window means `right = 0`.
    pub fn new(causal: bool, window: (i64, i64)) -> Result<Mask> {
        let side = |v: i64, what: &'static str| -> Result<Option<usize>> {
            match v {
                -1 => Ok(None),
                v if v >= 0 => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
                v => Err(Error::invalid("window", format!("{what} >= 0 or -1 (unbounded)"), v)),
            }
        };
        let left = side(window.0, "left")?;
        let right = if causal { Some(0) } else { side(window.1, "right")? };
        Ok(Mask { left, right })
    }

    /// Whether some key may be hidden from some query (so block skipping and masking apply).
    pub fn is_active(&self) -> bool {
        self.left.is_some() || self.right.is_some()
    }

    /// The keys visible to query row `i` of a sequence with `sq` queries and `sk` keys: always a contiguous
    /// range (possibly empty).
    #[inline]
    pub fn key_range(&self, i: usize, sq: usize, sk: usize) -> Range<usize> {
        let diag = i as i64 + sk as i64 - sq as i64;
        let lo = match self.left {
            Some(l) => (diag - l.min(i64::MAX as usize / 2) as i64).max(0),
            None => 0,
        };
        let hi = match self.right {
            Some(r) => (diag + r.min(i64::MAX as usize / 2) as i64 + 1).clamp(0, sk as i64),
            None => sk as i64,
        };
        let lo = lo.min(sk as i64);
        lo as usize..(hi.max(lo)) as usize
    }

    /// Whether key `j` is visible to query `i`.
    #[inline]
    pub fn visible(&self, i: usize, j: usize, sq: usize, sk: usize) -> bool {
        self.key_range(i, sq, sk).contains(&j)
    }

    /// The queries that see key `j` (the transpose of [`Mask::key_range`]), used by the backward pass.
    pub fn query_range(&self, j: usize, sq: usize, sk: usize) -> Range<usize> {
        if j >= sk {
            return 0..0;
        }
        // visible iff  j - right <= i + off  and  i + off <= j + left,  off = sk - sq.
        let off = sk as i64 - sq as i64;
        let lo = match self.right {
            Some(r) => (j as i64 - r.min(i64::MAX as usize / 2) as i64 - off).max(0),
            None => 0,
        };
        let hi = match self.left {
            Some(l) => (j as i64 + l.min(i64::MAX as usize / 2) as i64 - off + 1).clamp(0, sq as i64),
            None => sq as i64,
        };
        let lo = lo.min(sq as i64);
        lo as usize..(hi.max(lo)) as usize
    }
}

/// Soft-capping: `cap * tanh(s / cap)` when `cap > 0`, else `s`.
#[inline]
pub fn softcap(s: f32, cap: f32) -> f32 {
    if cap > 0.0 {
        cap * (s / cap).tanh()
    } else {
        s
    }
}

/// The ALiBi bias added to score `(i, j)`: `-slope * |i + sk - sq - j|`.
#[inline]
pub fn alibi_bias(slope: f32, i: usize, j: usize, sq: usize, sk: usize) -> f32 {
    let dist = (i as i64 + sk as i64 - sq as i64 - j as i64).unsigned_abs() as f32;
    -slope * dist
}

/// The key/value head read by query head `qh` (MQA/GQA): `qh / (h / hk)`.
#[inline]
pub fn kv_head(qh: usize, h: usize, hk: usize) -> usize {
    qh / (h / hk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(m: Mask, sq: usize, sk: usize) -> Vec<String> {
        (0..sq).map(|i| (0..sk).map(|j| if m.visible(i, j, sq, sk) { '1' } else { '0' }).collect()).collect()
    }

    #[test]
    fn spec_examples() {
        assert_eq!(pattern(Mask::CAUSAL, 2, 5), ["11110", "11111"]);
        assert_eq!(pattern(Mask::CAUSAL, 5, 2), ["00", "00", "00", "10", "11"]);
    }

    #[test]
    fn window_and_causal_resolution() {
        assert_eq!(Mask::new(true, (-1, -1)).unwrap(), Mask::CAUSAL);
        assert_eq!(Mask::new(true, (3, 7)).unwrap(), Mask { left: Some(3), right: Some(0) });
        assert_eq!(Mask::new(false, (2, 1)).unwrap(), Mask { left: Some(2), right: Some(1) });
        assert_eq!(Mask::new(false, (-2, 1)).unwrap_err().arg(), Some("window"));
        assert_eq!(pattern(Mask { left: Some(1), right: Some(1) }, 4, 4), ["1100", "1110", "0111", "0011"]);
    }

    #[test]
    fn query_range_is_transpose_of_key_range() {
        let masks = [
            Mask::NONE,
            Mask::CAUSAL,
            Mask { left: Some(2), right: Some(1) },
            Mask { left: Some(0), right: Some(0) },
            Mask { left: None, right: Some(3) },
        ];
        for m in masks {
            for (sq, sk) in [(5, 2), (2, 5), (4, 4), (7, 3), (1, 9), (9, 1)] {
                for j in 0..sk {
                    let col: Vec<usize> = (0..sq).filter(|&i| m.visible(i, j, sq, sk)).collect();
                    let r = m.query_range(j, sq, sk);
                    assert_eq!(col, r.collect::<Vec<_>>(), "{m:?} sq={sq} sk={sk} j={j}");
                }
            }
        }
    }

    #[test]
    fn alibi_and_softcap() {
        assert_eq!(alibi_bias(0.5, 0, 3, 2, 5), -0.0);
        assert_eq!(alibi_bias(0.5, 0, 0, 2, 5), -1.5);
        assert!((softcap(100.0, 50.0) - 50.0 * 2f32.tanh()).abs() < 1e-4);
        assert_eq!(softcap(3.0, 0.0), 3.0);
        assert_eq!(kv_head(5, 6, 2), 1);
    }
}
