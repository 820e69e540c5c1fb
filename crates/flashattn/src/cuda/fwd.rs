//! The forward launcher: the path choice (the Hopper kernel of `fwd_sm90.rs` where it covers the problem) and
//! the sm80-class kernel's variant, shared memory and grid.

use super::call::{check_sizes, fwd_params, variant_for, FwdArgs};
use super::compile::Pass;
use super::launch::launch;
use super::runtime::Gpu;
use crate::error::{Error, Result};
use crate::problem::Problem;
use cudarc::driver::sys as dsys;

/// Forward tile sizes `(BLOCK_M, BLOCK_N, warps)`: the defaults of `fwd.cu` (FWD_DEFAULT_TILES).
pub(crate) fn fwd_tiles(head_dim: usize) -> (u32, u32, u32) {
    match head_dim {
        0..=64 => (128, 128, 4),
        65..=128 => (128, 64, 4),
        _ => (128, 64, 8),
    }
}

/// Dynamic shared memory of the forward kernel (`FWD_SMEM_BYTES`).
pub(crate) fn fwd_smem(head_dim: usize) -> u32 {
    let (bm, bn, _) = fwd_tiles(head_dim);
    (bm + 2 * bn) * (head_dim as u32 + 8) * 2
}

/// Runs the forward kernel on `stream`: the sm90 kernel on Hopper for the problems it covers
/// (`fwd_sm90::covers`), else the sm80-class kernel.
pub(crate) fn run(gpu: &Gpu, stream: dsys::CUstream, p: &Problem, a: &FwdArgs, aligned16: bool) -> Result<()> {
    check_sizes(p)?;
    if super::fwd_sm90::covers(gpu, p, aligned16) && super::fwd_sm90::run(gpu, stream, p, a)? {
        return Ok(());
    }
    let v = variant_for(p, Pass::Fwd, aligned16, false)?;
    let (bm, _, warps) = fwd_tiles(v.head_dim);
    let smem = fwd_smem(v.head_dim);
    if smem as i64 > gpu.smem_optin as i64 {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!(
                "head dim {} on {} ({} B of shared memory per block needed, {} available)",
                p.d, gpu.name, smem, gpu.smem_optin
            ),
        });
    }
    let m = gpu.module(&v)?;
    let params = fwd_params(p, a);
    let grid = ((p.max_seqlen_q() as u32).div_ceil(bm), p.batch as u32, p.h as u32);
    // SAFETY: `params` mirrors FwdParams; its pointers come from buffers sized for this problem.
    unsafe { launch(&m.kernels["flash_fwd"], "flash_fwd", stream, grid, 32 * warps, smem, &params) }
}
