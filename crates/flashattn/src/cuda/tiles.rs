//! Kernel shapes that are pure functions of a head dim: the head dims each Hopper kernel is compiled for, the
//! sm90 forward's key-block sizes, the KV-cache kernel's default pipeline depth. The bottom of the CUDA host's
//! layers: compilation (`compile.rs`, which turns them into `-D` macros) and the launchers read them here. Also
//! the value head dims the sm80-class kernels take beside the query/key head dim ([`VALUE_DIM_PAIRS`]).

use crate::error::{Error, Result};

/// Head dims the sm80-class kernels are compiled for; a problem's `d` runs on the smallest one `>= d`.
pub const HEAD_DIMS: [usize; 8] = [32, 64, 96, 128, 160, 192, 224, 256];

/// The padded head dim a problem with head dim `d` runs on (sm80-class kernels).
pub fn padded_head_dim(d: usize) -> Option<usize> {
    HEAD_DIMS.iter().copied().find(|&h| h >= d)
}

/// Head dims the sm90 kernel is compiled for; a problem's `d` runs on the smallest one `>= d`.
pub const SM90_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The padded head dim of the sm90 kernel for head dim `d`.
pub fn sm90_head_dim(d: usize) -> Option<usize> {
    SM90_HEAD_DIMS.iter().copied().find(|&h| h >= d)
}

/// Key rows per block by default (`SM90_BN` of the kernel without `SM90_BN_OVERRIDE`).
pub fn block_n(head_dim: usize) -> usize {
    if head_dim <= 128 {
        128
    } else {
        64
    }
}

/// Keys per K/V block of FA3's wider form of the forward at a head dim, where it has one: 176 at head dim 128
/// (128 x 176 tiles), 80 at head dim 256 (128 x 80 tiles; both as `SM90_BN_OVERRIDE` in `fwd_sm90.cu`).
pub const fn wide_block_n(head_dim: usize) -> Option<usize> {
    match head_dim {
        128 => Some(176),
        256 => Some(80),
        _ => None,
    }
}

/// Head dims the sm90 backward is compiled for; a problem's `d` runs on the smallest one `>= d`.
pub const SM90_BWD_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The padded head dim of the sm90 backward for head dim `d`.
pub fn sm90_bwd_head_dim(d: usize) -> Option<usize> {
    SM90_BWD_HEAD_DIMS.iter().copied().find(|&h| h >= d)
}

/// The default `KV_STAGES` of a padded head dim: 3 up to 128, else 2 ([`crate::Tuning::kv_stages`] overrides
/// it per call; the value is passed to NVRTC, so the cache keeps one cubin per setting).
pub fn default_stages(head_dim: usize) -> u32 {
    if head_dim > 128 {
        2
    } else {
        3
    }
}

/// Padded `(head dim, value head dim)` pairs the sm80-class forward and backward are compiled for with a value
/// head dim of its own (`HEAD_DIM`, `HEAD_DIM_V`): DeepSeek-style 192/128, a narrower and a wider value. A
/// problem's `(d, d_v)` with `d_v != d` runs on the pair of its padded dims ([`value_head_dim`]).
pub const VALUE_DIM_PAIRS: [(usize, usize); 3] = [(192, 128), (128, 64), (64, 128)];

/// The padded value head dim (`HEAD_DIM_V`) of the sm80-class kernels for a problem with head dims `d` and `d_v`:
/// `None` when `d_v == d` (the kernels' own head dim serves both), `Some` when the padded pair is one of
/// [`VALUE_DIM_PAIRS`], else `Unsupported` naming both dims and the pairs that run.
pub fn value_head_dim(d: usize, d_v: usize) -> Result<Option<usize>> {
    if d_v == d {
        return Ok(None);
    }
    match (padded_head_dim(d), padded_head_dim(d_v)) {
        (Some(hd), Some(hv)) if VALUE_DIM_PAIRS.contains(&(hd, hv)) => Ok(Some(hv)),
        _ => Err(Error::Unsupported {
            backend: "cuda",
            what: format!(
                "a value head dim d_v = {d_v} with query/key head dim d = {d} (the CUDA kernels take d_v != d when \
                 the dims pad to one of (d, d_v) = {})",
                value_dim_pairs_text()
            ),
        }),
    }
}

/// [`VALUE_DIM_PAIRS`] in words: `(192, 128), (128, 64), (64, 128)`.
pub fn value_dim_pairs_text() -> String {
    VALUE_DIM_PAIRS.iter().map(|(d, v)| format!("({d}, {v})")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kernel family pads a head dim to the smallest of its head dims `>= d`, and has none above its largest.
    #[test]
    fn padded_head_dims() {
        type Pad = fn(usize) -> Option<usize>;
        type Cases = &'static [(usize, Option<usize>)];
        let families: [(&str, Pad, Cases); 3] = [
            ("sm80-class", padded_head_dim, &[(40, Some(64)), (111, Some(128)), (256, Some(256)), (257, None)]),
            ("sm90 forward", sm90_head_dim, &[(40, Some(64)), (96, Some(128)), (192, Some(256)), (257, None)]),
            (
                "sm90 backward",
                sm90_bwd_head_dim,
                &[
                    (32, Some(64)),
                    (64, Some(64)),
                    (96, Some(128)),
                    (128, Some(128)),
                    (129, Some(256)),
                    (192, Some(256)),
                    (256, Some(256)),
                    (257, None),
                ],
            ),
        ];
        for (family, pad, cases) in families {
            for &(d, padded) in cases {
                assert_eq!(pad(d), padded, "{family}: head dim {d}");
            }
        }
    }
}
