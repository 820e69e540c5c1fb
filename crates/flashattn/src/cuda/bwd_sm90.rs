//! The Hopper (sm_90a) backward path (`kernels/bwd_sm90.cu`): which problems it covers, the TMA tensor maps
//! of q, k, v and dO, and the launch of its main kernel between bwd.cu's preprocess and dQ conversion
//! (`bwd.rs`). Problems it does not cover run on the sm80-class kernel; [`crate::Tuning::cuda_path`] = `Sm80`
//! forces that path on Hopper too, and [`crate::Tuning::bwd_path`] = `Sm80` does so for the backward alone.

use super::call::{check_sizes, variant_for, BwdArgs};
use super::compile::{Pass, Variant};
use super::launch::launch;
use super::params::BwdParams;
use super::runtime::Gpu;
use super::tiles::{sm90_bwd_head_dim, SM90_BWD_HEAD_DIMS};
use super::tma::{dq_accum_map, tensor_map};
use crate::error::{Error, Result};
use crate::problem::Problem;
use cudarc::driver::sys as dsys;

thread_local! {
    static LAUNCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many sm90 backward kernels the calling thread has launched (tests use it to prove which path ran; per
/// thread, so that tests running side by side, each with its own tuning, do not see each other's launches).
pub fn sm90_backward_launches() -> u64 {
    LAUNCHES.with(|n| n.get())
}

/// A tensor map aligned as the kernel's `TmaMap` (`__align__(128)`), whatever alignment the bindings give
/// `CUtensorMap`.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct Tma(dsys::CUtensorMap);

/// Mirror of `Sm90BwdParams` in `bwd_sm90.cu`: the backward fields and five tensor maps (q, k, v, dO; the f32 dQ
/// accumulator).
#[repr(C)]
#[derive(Clone, Copy)]
struct Sm90BwdParams {
    b: BwdParams,
    l2_group: i32,
    tq: Tma,
    tk: Tma,
    tv: Tma,
    tdo: Tma,
    tdq: Tma,
}

/// Whether the sm90 backward runs this problem on this device ([`covers_on`] with the device's architecture).
pub(crate) fn covers(gpu: &Gpu, p: &Problem, aligned16: bool) -> bool {
    covers_on(&gpu.arch, p, aligned16)
}

/// Whether the sm90 backward runs this problem on a device of architecture `arch`: a Hopper device, head dim <= 256,
/// a value head dim equal to the head dim (others run on the sm80-class kernel), 16-byte aligned pointers and
/// strides (TMA), non-empty q and k, no `seqused_k` (the TMA would read the unused cache slots, see
/// `fwd_sm90::covers`), and the problem's tuning allows it ([`crate::Tuning::sm90_backward_allowed`]).
/// Deterministic mode runs here too (the same turn-taking dQ counters as bwd.cu's).
pub(crate) fn covers_on(arch: &str, p: &Problem, aligned16: bool) -> bool {
    arch == "sm_90a"
        && p.tuning.sm90_backward_allowed()
        && sm90_bwd_head_dim(p.d).is_some()
        && p.d_v == p.d
        && aligned16
        && p.total_q > 0
        && p.total_k > 0
        && p.batch > 0
        && p.seqused_k.is_none()
        && check_sizes(p).is_ok()
}

/// The sm90 backward variant of a problem (`grad_f32`: it writes f32 `dk`, `dv`).
pub(crate) fn sm90_bwd_variant(p: &Problem, deterministic: bool, grad_f32: bool) -> Result<Variant> {
    let v = variant_for(p, Pass::Bwd, true, deterministic)?;
    let head_dim = sm90_bwd_head_dim(p.d).ok_or_else(|| Error::Unsupported {
        backend: "cuda",
        what: format!(
            "the sm90 backward at head dim {} (at most {})",
            p.d,
            SM90_BWD_HEAD_DIMS[SM90_BWD_HEAD_DIMS.len() - 1]
        ),
    })?;
    Ok(Variant { pass: Pass::BwdSm90, head_dim, aligned16: true, grad_f32, ..v })
}

/// (batch, kv head) pairs per group of the kernel's tile order. Without masks 1 (key blocks innermost: the CTAs
/// running together share one head's Q and dO). With masks CTAs differ in length (causal: the first key block
/// sees every query, the last a few), so a group takes as many pairs as an L2 budget for their Q and dO allows
/// ([`crate::Tuning::bwd90_l2_group_mib`], 24 MiB by default): its long CTAs start first, the short ones fill the tail.
fn l2_group(p: &Problem, head_dim: usize, sq: usize) -> i32 {
    let pairs = (p.batch * p.hk).max(1);
    if !p.mask.is_active() {
        return 1;
    }
    let per_pair = (sq.max(1) * head_dim * 4 * (p.h / p.hk.max(1)).max(1)) as u64; // Q + dO, 16-bit
    let mib = p.tuning.bwd90_l2_group_mib;
    ((mib.max(1) << 20) / per_pair).clamp(1, pairs as u64) as i32
}

/// Launches the sm90 main kernel on `stream` with the backward's parameters (scratch buffers included, laid
/// out for the same padded head dim). Returns `Ok(false)` without launching when the driver refuses a tensor
/// map for these layouts or the kernel's shared memory does not fit (the caller then runs bwd.cu's main).
pub(crate) fn run(
    gpu: &Gpu,
    stream: dsys::CUstream,
    p: &Problem,
    a: &BwdArgs,
    params: &BwdParams,
    deterministic: bool,
) -> Result<bool> {
    let v = sm90_bwd_variant(p, deterministic, a.grad_f32)?;
    let (q_rows, k_rows, batch) =
        if p.varlen { (p.total_q, p.total_k, 1) } else { (p.dense_sq, p.total_k / p.batch, p.batch) };
    let m = gpu.module(&v)?;
    // BM (query rows per step) and BN (keys per CTA) are constants of the kernel's head dim.
    let Some([bm, bn, threads, smem]) = m.bwd_config else {
        return Err(Error::Device(format!("the module {v} does not export flash_bwd_config (stale kernel source?)")));
    };
    if smem > gpu.smem_optin {
        return Ok(false);
    }
    let bm = bm as u32;
    let maps = (
        tensor_map(&a.fwd.q, [p.d, q_rows, p.h, batch], bm),
        tensor_map(&a.fwd.k, [p.d, k_rows, p.hk, batch], 64),
        tensor_map(&a.fwd.v, [p.d, k_rows, p.hk, batch], 64),
        tensor_map(&a.dout, [p.d, q_rows, p.h, batch], bm),
    );
    let (Some(tq), Some(tk), Some(tv), Some(tdo)) = maps else { return Ok(false) };
    // The dQ accumulator `[rows_q, h, head_dim]` (f32), boxes of 32 columns x BM rows: read by the kernel at
    // HEAD_DIM 64 only (its tile reduce-adds), left zero at the other head dims.
    let tdq = if v.head_dim == 64 {
        let Some(m) = dq_accum_map(params.dq_accum as u64, v.head_dim, p.h, params.rows_q.max(0) as usize, bm) else {
            return Ok(false);
        };
        m
    } else {
        // SAFETY: an all-zero CUtensorMap is a valid value; the kernel does not read it at this head dim.
        unsafe { std::mem::zeroed() }
    };
    let num_n_blocks = (params.fwd.sk.max(0) as u32).div_ceil(bn.max(1) as u32);
    let prm = Sm90BwdParams {
        b: *params,
        l2_group: l2_group(p, v.head_dim, params.fwd.sq.max(0) as usize),
        tq: Tma(tq),
        tk: Tma(tk),
        tv: Tma(tv),
        tdo: Tma(tdo),
        tdq: Tma(tdq),
    };
    let grid = (num_n_blocks * (p.hk * p.batch) as u32, 1, 1);
    // SAFETY: `prm` mirrors Sm90BwdParams (layout pinned by the test below); its pointers, scratch buffers and
    // tensor maps describe buffers sized for this problem and live until the kernel has run (stream order).
    unsafe { launch(&m.kernels["flash_bwd_sm90"], "flash_bwd_sm90", stream, grid, threads as u32, smem as u32, &prm)? };
    LAUNCHES.with(|n| n.set(n.get() + 1));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::align_of;

    #[test]
    fn layout_matches_bwd_sm90_cu() {
        // BwdParams is 432 bytes; TmaMap is __align__(128) in the kernel.
        assert_eq!(align_of::<Tma>(), 128);
        assert_layout!(Sm90BwdParams, size 1152, {
            l2_group: 432,
            tq: 512,
            tk: 640,
            tv: 768,
            tdo: 896,
            tdq: 1024,
        });
    }
}
