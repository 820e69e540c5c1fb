//! The backward launcher: preprocess (rowsum(dO * O), lse in log2 units, zeroed dQ accumulator), main
//! (dK, dV per key block, dQ accumulated in f32), convert (dQ to the dtype), with scratch buffers. The main
//! kernel is the Hopper one (`bwd_sm90.rs`) where it covers the problem, else bwd.cu's.

use super::call::{check_sizes, fwd_params, max_sk, variant_for, BwdArgs};
use super::compile::{padded_head_dim, Pass, Variant};
use super::launch::{launch, zero};
use super::params::BwdParams;
use super::runtime::{dev_err, Gpu};
use crate::error::{Error, Result};
use crate::problem::Problem;
use cudarc::driver::{CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// Where the backward's scratch buffers live in one workspace (byte offsets, each 256-byte aligned): `D =
/// rowsum(dO * O)` and the log2-unit lse (`f32 [h, rows_q]` each), the dQ accumulator (`f32 [rows_q, h,
/// head_dim]` at the widest head dim either main kernel may use), and the deterministic mode's dQ counters
/// (`i32`, one per (batch, head, 16-row query block): room for every kernel's block height); with a learnable
/// sink, the main kernels' partial `dsink` sums (`f32 [b, h, dsink_blocks, 8]`: one slot per warp of each
/// 64-key block, room for every kernel's key block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BwdWorkspace {
    pub dpsum: usize,
    pub lse_log2: usize,
    pub dq_accum: usize,
    pub sem: usize,
    pub sem_bytes: usize,
    pub dsink_part: usize,
    pub dsink_part_bytes: usize,
    pub dsink_blocks: usize,
    pub bytes: usize,
}

/// The workspace layout of a problem's backward: a pure function of the problem (no device, no module).
pub(crate) fn workspace_layout(p: &Problem, deterministic: bool) -> Result<BwdWorkspace> {
    let sm80_hd = padded_head_dim(p.d).ok_or_else(|| Error::invalid("q", "head dim <= 256", p.d))?;
    let sm90_hd = super::tiles::sm90_bwd_head_dim(p.d).unwrap_or(0);
    let hd = sm80_hd.max(sm90_hd);
    let rows_q = p.total_q;
    let align = |x: usize| x.div_ceil(256) * 256;
    let vec_bytes = align(p.h * rows_q * 4);
    let dpsum = 0;
    let lse_log2 = dpsum + vec_bytes;
    let dq_accum = lse_log2 + vec_bytes;
    let sem = dq_accum + align(rows_q * p.h * hd * 4);
    let sem_bytes = if deterministic { p.batch * p.h * p.max_seqlen_q().div_ceil(16) * 4 } else { 0 };
    let dsink_part = sem + align(sem_bytes);
    let dsink_blocks = if p.sink.is_some() { max_sk(p).div_ceil(64).max(1) } else { 0 };
    let dsink_part_bytes = p.batch * p.h * dsink_blocks * 8 * 4;
    Ok(BwdWorkspace {
        dpsum,
        lse_log2,
        dq_accum,
        sem,
        sem_bytes,
        dsink_part,
        dsink_part_bytes,
        dsink_blocks,
        bytes: (dsink_part + align(dsink_part_bytes)).max(256),
    })
}

/// Whose softmax the backward's `lse` (and so `D = rowsum(dO * O)`) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Softmax {
    /// This call's keys: a row that sees one key has a constant softmax (without a learnable sink), and its `dS`
    /// is exactly 0.
    Whole,
    /// A larger set of keys of which this call holds a part (ring attention): every row takes the general
    /// formula.
    Part,
}

/// Runs the three backward kernels on `stream` (on the sm80-class main kernel when the problem's value head dim
/// differs from `d`: `bwd_sm90::covers` leaves those to it), with their scratch buffers in `workspace` (a device address
/// of at least [`workspace_layout`]`.bytes`, 256-byte aligned) or, when `None`, in a buffer allocated here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    p: &Problem,
    a: &BwdArgs,
    aligned16: bool,
    deterministic: bool,
    softmax: Softmax,
    workspace: Option<u64>,
) -> Result<()> {
    check_sizes(p)?;
    let sm90 = super::bwd_sm90::covers(gpu, p, aligned16);
    let mut v = Variant { grad_f32: a.grad_f32, ..variant_for(p, Pass::Bwd, aligned16, deterministic)? };
    if sm90 {
        // Preprocess and conversion share the dQ accumulator's layout ([rows, h, HEAD_DIM]) with the sm90 kernel.
        v.head_dim = super::bwd_sm90::sm90_bwd_variant(p, deterministic, a.grad_f32)?.head_dim;
    }
    let m = gpu.module(&v)?;
    // Every bwd.cu module exports its tile configuration (`flash_bwd_config`): the launcher reads it rather
    // than mirroring bwd.cu's per-head-dim, per-architecture table.
    let [bm, bn, threads, smem] = m.bwd_config.ok_or_else(|| {
        Error::Device(format!("the backward module {v} does not export flash_bwd_config (stale kernel source?)"))
    })?;
    if smem > gpu.smem_optin {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!(
                "backward at head dim {} on {} ({smem} B of shared memory per block needed, {} available)",
                p.d, gpu.name, gpu.smem_optin
            ),
        });
    }
    let cs = stream.cu_stream();
    let sq = p.max_seqlen_q();
    let sk = max_sk(p);
    let rows_q = p.total_q;
    let layout = workspace_layout(p, deterministic)?;
    let n_sem = if deterministic { p.batch * p.h * sq.div_ceil((bm as usize).min(64)) } else { 0 };
    if n_sem * 4 > layout.sem_bytes {
        return Err(Error::Device(format!("backward module {v} has {bm}-row blocks, finer than the workspace's 16")));
    }
    // The caller's workspace, or one allocated here (freed in stream order after the kernels).
    let owned = match workspace {
        Some(_) => None,
        None => Some(
            // SAFETY: the kernels write every element before reading it (preprocess fills or zeroes them).
            unsafe { stream.alloc::<u8>(layout.bytes) }.map_err(|e| dev_err("allocating backward scratch", e))?,
        ),
    };
    let base = match (&owned, workspace) {
        (Some(buf), _) => buf.device_ptr(stream).0,
        (None, Some(ws)) => ws,
        (None, None) => unreachable!("one of the two is set"),
    };
    let sem_ptr = if deterministic { base + layout.sem as u64 } else { 0 };
    if deterministic {
        zero(sem_ptr, n_sem * 4, cs)?;
    }
    let sink = p.sink.is_some();
    if sink != (a.dsink != 0) {
        return Err(Error::invalid("dsink", "a dsink buffer exactly when a sink is given", a.dsink));
    }
    let dsink_part = if sink { base + layout.dsink_part as u64 } else { 0 };
    if sink {
        // Key blocks a main kernel skips (past a sequence's keys, or seen by no query) write no partial sum.
        zero(dsink_part, layout.dsink_part_bytes, cs)?;
    }
    let params = BwdParams {
        fwd: fwd_params(p, &a.fwd),
        dout: a.dout.ptr as *const c_void,
        dq: a.dq.ptr as *mut c_void,
        dk: a.dk.ptr as *mut c_void,
        dv: a.dv.ptr as *mut c_void,
        do_batch_stride: a.dout.batch,
        do_row_stride: a.dout.row,
        do_head_stride: a.dout.head,
        dq_batch_stride: a.dq.batch,
        dq_row_stride: a.dq.row,
        dq_head_stride: a.dq.head,
        dk_batch_stride: a.dk.batch,
        dk_row_stride: a.dk.row,
        dk_head_stride: a.dk.head,
        dv_batch_stride: a.dv.batch,
        dv_row_stride: a.dv.row,
        dv_head_stride: a.dv.head,
        dpsum: (base + layout.dpsum as u64) as *mut f32,
        lse_log2: (base + layout.lse_log2 as u64) as *mut f32,
        dq_accum: (base + layout.dq_accum as u64) as *mut f32,
        dq_semaphore: sem_ptr as *mut i32,
        rows_q: rows_q as i32,
        // A row that sees one key has a constant softmax only without a sink (the sink is a second logit).
        exact_one_key: i32::from(softmax == Softmax::Whole && p.sink.is_none()),
        dsink_part: dsink_part as *mut f32,
        dsink: a.dsink as *mut f32,
        dsink_blocks: layout.dsink_blocks as i32,
        d_v: p.d_v as i32,
    };
    let rows_grid = ((sq as u32).div_ceil(64), p.h as u32, p.batch as u32);
    // SAFETY: `params` mirrors BwdParams; every pointer refers to a buffer sized for this problem, and the
    // scratch buffers live until their stream-ordered free after the kernels.
    unsafe {
        launch(&m.kernels["flash_bwd_preprocess"], "flash_bwd_preprocess", cs, rows_grid, 256, 0, &params)?;
        if !(sm90 && super::bwd_sm90::run(gpu, cs, p, a, &params, deterministic)?) {
            let main_grid = ((sk as u32).div_ceil(bn as u32), p.hk as u32, p.batch as u32);
            launch(
                &m.kernels["flash_bwd_main"],
                "flash_bwd_main",
                cs,
                main_grid,
                threads as u32,
                smem as u32,
                &params,
            )?;
        }
        launch(&m.kernels["flash_bwd_convert_dq"], "flash_bwd_convert_dq", cs, rows_grid, 256, 0, &params)?;
        if sink {
            launch(&m.kernels["flash_bwd_dsink"], "flash_bwd_dsink", cs, (p.h as u32, 1, 1), 32, 0, &params)?;
        }
    }
    // An owned workspace is freed in stream order when dropped here.
    drop(owned);
    Ok(())
}
