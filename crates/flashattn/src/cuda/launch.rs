//! Launching a kernel with a parameter block passed by value, and the test hook that poisons outputs.

use super::runtime::{dev_err, Kernel};
use crate::error::Result;
use cudarc::driver::{result as dres, sys as dsys};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

static POISON: AtomicBool = AtomicBool::new(false);

/// Test hook for the whole process: when on, every output buffer the CUDA backend writes (o, lse, dq, dk, dv)
/// is filled with NaN before the kernels run, so an element a kernel forgets to write fails the accuracy check.
/// The same as [`crate::Tuning::poison_outputs`] on every call (for test suites that cannot reach each call's
/// options, such as the Python package's).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// Whether a call with tuning `t` poisons its outputs before the launches ([`set_poison_outputs`] or
/// [`crate::Tuning::poison_outputs`]).
pub fn poison_outputs(t: &crate::tuning::Tuning) -> bool {
    t.poison_outputs || POISON.load(Ordering::Relaxed)
}

/// Fills `bytes` bytes at `ptr` with 0xFF (NaN in f16, bf16 and f32) on `stream`.
pub(crate) fn poison(ptr: u64, bytes: usize, stream: dsys::CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: the caller passes a device range it owns or was given for output.
    unsafe { dres::memset_d8_async(ptr, 0xFF, bytes, stream) }.map_err(|e| dev_err("poisoning an output", e))
}

/// Zero-fills `bytes` bytes at `ptr` on `stream`.
pub(crate) fn zero(ptr: u64, bytes: usize, stream: dsys::CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: as for `poison`.
    unsafe { dres::memset_d8_async(ptr, 0, bytes, stream) }.map_err(|e| dev_err("zeroing a buffer", e))
}

/// Launches `k` with one by-value parameter block.
///
/// # Safety
/// `P` must match the kernel's parameter type exactly, and every pointer inside it must be valid for what
/// the kernel does with it.
pub(crate) unsafe fn launch<P: Copy>(
    k: &Kernel,
    name: &str,
    stream: dsys::CUstream,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    params: &P,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let mut p = *params;
    let mut args = [&mut p as *mut P as *mut c_void];
    dres::launch_kernel(k.func.cu_function(), grid, (threads, 1, 1), smem, stream, &mut args)
        .map_err(|e| dev_err(&format!("launching {name} (grid {grid:?}, {threads} threads, {smem} B smem)"), e))
}
