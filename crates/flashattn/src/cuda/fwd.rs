//! The forward launcher: variant choice, parameter block, grid.

use super::compile::{padded_head_dim, Pass, Variant};
use super::launch::launch;
use super::params::FwdParams;
use super::runtime::Gpu;
use super::tensor::DevView;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::problem::Problem;
use cudarc::driver::sys as dsys;
use std::ffi::c_void;

/// Device pointers of a forward call (and the inputs a backward shares).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FwdArgs {
    pub q: DevView,
    pub k: DevView,
    pub v: DevView,
    pub o: DevView,
    /// `f32`, contiguous `[b, h, sq]` (varlen: `[h, total_q]`).
    pub lse: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub seqused_k: u64,
    pub alibi: u64,
    /// Learnable sink logits, `f32 [h]` (0: none). The forward kernels read it; the backward ignores it.
    pub sink: u64,
}

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

/// Longest key sequence the kernel should plan for (before `seqused_k`).
pub(crate) fn max_sk(p: &Problem) -> usize {
    match &p.cu_seqlens {
        Some((_, ck)) => ck.windows(2).map(|w| (w[1] - w[0]).max(0) as usize).max().unwrap_or(0),
        None => p.max_seqlen_k(),
    }
}

fn window(side: Option<usize>, limit: usize) -> i32 {
    match side {
        // A side at least as wide as every sequence is the same as unbounded (and keeps int math safe).
        Some(w) if w < limit => w as i32,
        _ => -1,
    }
}

/// The variant flags a problem needs (forward or backward), with its call's compile-time tuning
/// ([`Variant::tuned`]).
pub(crate) fn variant_for(p: &Problem, pass: Pass, aligned16: bool, deterministic: bool) -> Result<Variant> {
    let head_dim = padded_head_dim(p.d).ok_or_else(|| Error::invalid("q", "head dim <= 256", p.d))?;
    let bf16 = match p.dtype {
        DType::F16 => false,
        DType::BF16 => true,
        other => return Err(super::unsupported_dtype(other)),
    };
    let softcap = p.softcap > 0.0;
    let alibi = p.alibi.is_some();
    if !(softcap || alibi) && p.scale <= 0.0 {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!("softmax_scale {} (the kernels need a positive scale)", p.scale),
        });
    }
    Ok(Variant {
        pass,
        head_dim,
        bf16,
        mask: p.mask.is_active(),
        alibi,
        softcap,
        varlen: p.varlen,
        deterministic: deterministic && pass == Pass::Bwd,
        aligned16,
        bm192: false,
        wide_n: false,
        kv_stages: None,
        nvrtc: Default::default(),
        sink: p.sink.is_some() && pass == Pass::Bwd,
    }
    .tuned(&p.tuning))
}

/// The forward parameter block of a problem.
pub(crate) fn fwd_params(p: &Problem, a: &FwdArgs) -> FwdParams {
    let sq = p.max_seqlen_q();
    let sk = max_sk(p);
    let limit = sq + sk + 1;
    let (lse_b, lse_h) = if p.varlen { (0, p.total_q as i64) } else { ((p.h * sq) as i64, sq as i64) };
    let (alibi_slopes, alibi_batch_stride) = match &p.alibi {
        Some(al) => (a.alibi as *const f32, if al.per_batch { p.h as i64 } else { 0 }),
        None => (std::ptr::null(), 0),
    };
    FwdParams {
        q: a.q.ptr as *const c_void,
        k: a.k.ptr as *const c_void,
        v: a.v.ptr as *const c_void,
        o: a.o.ptr as *mut c_void,
        lse: a.lse as *mut f32,
        q_batch_stride: a.q.batch,
        q_row_stride: a.q.row,
        q_head_stride: a.q.head,
        k_batch_stride: a.k.batch,
        k_row_stride: a.k.row,
        k_head_stride: a.k.head,
        v_batch_stride: a.v.batch,
        v_row_stride: a.v.row,
        v_head_stride: a.v.head,
        o_batch_stride: a.o.batch,
        o_row_stride: a.o.row,
        o_head_stride: a.o.head,
        lse_batch_stride: lse_b,
        lse_head_stride: lse_h,
        b: p.batch as i32,
        h: p.h as i32,
        hk: p.hk as i32,
        sq: sq as i32,
        sk: sk as i32,
        d: p.d as i32,
        cu_seqlens_q: a.cu_q as *const i32,
        cu_seqlens_k: a.cu_k as *const i32,
        seqused_k: a.seqused_k as *const i32,
        scale: p.scale,
        softcap: p.softcap,
        alibi_slopes,
        alibi_batch_stride,
        window_left: if p.mask.is_active() { window(p.mask.left, limit) } else { -1 },
        window_right: if p.mask.is_active() { window(p.mask.right, limit) } else { -1 },
        sink: a.sink as *const f32,
    }
}

/// Checks sizes the kernels index with 32-bit integers.
pub(crate) fn check_sizes(p: &Problem) -> Result<()> {
    let big = [p.total_q, p.total_k, p.batch, p.h].into_iter().any(|x| x > i32::MAX as usize / 2);
    if big || p.batch > 65535 || p.h > 65535 {
        return Err(Error::Unsupported { backend: "cuda", what: "batch, heads or sequence lengths this large".into() });
    }
    Ok(())
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
