//! Kernel shapes that are pure functions of a head dim: the head dims each Hopper kernel is compiled for, the
//! sm90 forward's key-block sizes, the KV-cache kernel's default pipeline depth. The bottom of the CUDA host's
//! layers: compilation (`compile.rs`, which turns them into `-D` macros) and the launchers read them here.

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
