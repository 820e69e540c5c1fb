//! The backward launcher: preprocess (rowsum(dO * O), lse in log2 units, zeroed dQ accumulator), main
//! (dK, dV per key block, dQ accumulated in f32), convert (dQ to the dtype), with scratch buffers. The main
//! kernel is the Hopper one (`bwd_sm90.rs`) where it covers the problem, else bwd.cu's.

use super::compile::Pass;
use super::fwd::{self, FwdArgs};
use super::launch::{launch, zero};
use super::params::BwdParams;
use super::runtime::{dev_err, Gpu};
use super::tensor::DevView;
use crate::error::{Error, Result};
use crate::problem::Problem;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// Device pointers of a backward call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BwdArgs {
    pub fwd: FwdArgs,
    pub dout: DevView,
    pub dq: DevView,
    pub dk: DevView,
    pub dv: DevView,
}

fn scratch<T: cudarc::driver::DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the kernels write every element before reading it (preprocess fills or zeroes them).
    unsafe { stream.alloc::<T>(n.max(1)) }.map_err(|e| dev_err("allocating backward scratch", e))
}

/// Whose softmax the backward's `lse` (and so `D = rowsum(dO * O)`) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Softmax {
    /// This call's keys: a row that sees one key has a constant softmax, and its `dS` is exactly 0.
    Whole,
    /// A larger set of keys of which this call holds a part (ring attention): every row takes the general
    /// formula.
    Part,
}

/// Runs the three backward kernels on `stream`.
pub(crate) fn run(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    p: &Problem,
    a: &BwdArgs,
    aligned16: bool,
    deterministic: bool,
    softmax: Softmax,
) -> Result<()> {
    fwd::check_sizes(p)?;
    let sm90 = super::bwd_sm90::covers(gpu, p, aligned16);
    let mut v = fwd::variant_for(p, Pass::Bwd, aligned16, deterministic)?;
    if sm90 {
        // Preprocess and conversion share the dQ accumulator's layout ([rows, h, HEAD_DIM]) with the sm90 kernel.
        v.head_dim = super::bwd_sm90::sm90_bwd_variant(p, deterministic)?.head_dim;
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
    let sk = fwd::max_sk(p);
    let rows_q = p.total_q;
    let dpsum = scratch::<f32>(stream, p.h * rows_q)?;
    let lse_log2 = scratch::<f32>(stream, p.h * rows_q)?;
    let dq_accum = scratch::<f32>(stream, rows_q * p.h * v.head_dim)?;
    // Deterministic dQ counters, one per (batch, head, query block): bwd.cu's blocks are `bm` rows, the sm90
    // kernel's 64 or 128 (laid out [b, h, ceil(sq / BM)] by each kernel): room for the finer of the two.
    let n_sem = if deterministic { p.batch * p.h * sq.div_ceil((bm as usize).min(64)) } else { 0 };
    let sem = scratch::<i32>(stream, n_sem)?;
    let ptr = |s: &CudaSlice<f32>| s.device_ptr(stream).0;
    let sem_ptr = if deterministic { sem.device_ptr(stream).0 } else { 0 };
    if deterministic {
        zero(sem_ptr, n_sem * 4, cs)?;
    }
    let params = BwdParams {
        fwd: fwd::fwd_params(p, &a.fwd),
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
        dpsum: ptr(&dpsum) as *mut f32,
        lse_log2: ptr(&lse_log2) as *mut f32,
        dq_accum: ptr(&dq_accum) as *mut f32,
        dq_semaphore: sem_ptr as *mut i32,
        rows_q: rows_q as i32,
        exact_one_key: i32::from(softmax == Softmax::Whole),
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
    }
    // The scratch buffers are freed in stream order when dropped here.
    drop((dpsum, lse_log2, dq_accum, sem));
    Ok(())
}
