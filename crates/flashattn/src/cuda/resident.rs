//! [`DeviceAttention`]: one attention problem resident in device memory (inputs uploaded once, outputs
//! allocated once), whose kernels can be enqueued and timed with CUDA events without host copies: what
//! `flashattn bench --device cuda` measures.

use super::call::{require_half, require_no_dsink, variant_for, Aux, BwdArgs, FwdArgs};
use super::compile::{Pass, Variant};
use super::runtime::{self, dev_err, Gpu};
use super::tensor::{alloc_out, upload, DevTensor};
use super::{bwd, fwd};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::AttnOptions;
use crate::problem::{validate, Problem};
use crate::tensor::Tensor;
use cudarc::driver::sys as dsys;
use cudarc::driver::CudaSlice;
use cudarc::driver::DevicePtr;
use std::sync::Arc;

/// Bytes zeroed before each timed run when flushing the L2 cache (as triton's `do_bench` does: 256 MiB,
/// several times the L2 of current GPUs).
const FLUSH_BYTES: usize = 256 << 20;

/// The backward's device tensors.
struct BwdBufs {
    dout: DevTensor,
    dq: DevTensor,
    dk: DevTensor,
    dv: DevTensor,
}

/// One attention problem in device memory of CUDA device `n`: q/k/v (and dO) uploaded once with their
/// strides, o/lse (and dq/dk/dv) allocated once. [`forward`](Self::forward) and
/// [`backward`](Self::backward) only enqueue the kernels on the backend's stream (no copies, no
/// synchronisation); [`time`](Self::time) measures them with CUDA events.
pub struct DeviceAttention {
    gpu: Arc<Gpu>,
    p: Problem,
    deterministic: bool,
    aux: Aux,
    q: DevTensor,
    k: DevTensor,
    v: DevTensor,
    o: DevTensor,
    lse: DevTensor,
    bwd: Option<BwdBufs>,
    flush: Option<CudaSlice<u8>>,
}

impl DeviceAttention {
    /// Uploads `q`, `k`, `v` (and `dout`, which enables [`backward`](Self::backward)) to device `n` and
    /// allocates the outputs. Waits until the copies are done.
    pub fn new(
        n: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: Option<&Tensor>,
        opts: &AttnOptions,
    ) -> Result<DeviceAttention> {
        let p = validate(&q.view(), &k.view(), &v.view(), opts)?;
        require_half(&p)?;
        if p.out_dtype != p.dtype {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: format!("a resident problem with out_dtype {} (its output keeps the inputs' dtype)", p.out_dtype),
            });
        }
        if let Some(d) = dout {
            require_no_dsink(&p)?;
            if d.shape() != p.o_shape().as_slice() || d.dtype() != p.dtype {
                return Err(Error::invalid(
                    "dout",
                    format!("shape {:?} and dtype {}", p.o_shape(), p.dtype),
                    format!("{:?} {}", d.shape(), d.dtype()),
                ));
            }
        }
        let gpu = runtime::gpu(n)?;
        let s = gpu.stream.clone();
        gpu.run("uploading the problem", || {
            let up = |t: &Tensor| upload(&s, t.view().data, t.layout());
            let (dq_, dk_, dv_) = (up(q)?, up(k)?, up(v)?);
            let poisoned = super::launch::poison_outputs(&p.tuning);
            let o = alloc_out(&s, &p.o_shape(), p.dtype, poisoned)?;
            let lse = alloc_out(&s, &p.lse_shape(), DType::F32, poisoned)?;
            let bwd = match dout {
                Some(d) => Some(BwdBufs {
                    dout: up(d)?,
                    dq: alloc_out(&s, q.shape(), p.dtype, poisoned)?,
                    dk: alloc_out(&s, k.shape(), p.dtype, poisoned)?,
                    dv: alloc_out(&s, v.shape(), p.dtype, poisoned)?,
                }),
                None => None,
            };
            let aux = Aux::upload(&s, &p)?;
            s.synchronize().map_err(|e| dev_err("uploading the problem", e))?;
            Ok(DeviceAttention {
                gpu: gpu.clone(),
                p: p.clone(),
                deterministic: opts.deterministic,
                aux,
                q: dq_,
                k: dk_,
                v: dv_,
                o,
                lse,
                bwd,
                flush: None,
            })
        })
    }

    /// The backward's device pointers and whether all eight tensors are 16-byte aligned (what `bwd::run` is given).
    fn bwd_args(&self, b: &BwdBufs) -> (BwdArgs, bool) {
        let s = &self.gpu.stream;
        let a = BwdArgs {
            fwd: self.fwd_args(),
            dout: b.dout.view(s),
            dq: b.dq.view(s),
            dk: b.dk.view(s),
            dv: b.dv.view(s),
            // A resident problem with a backward has no sink (refused when it is built).
            dsink: 0,
            grad_f32: false,
        };
        let aligned = a.aligned16(self.p.dtype.size());
        (a, aligned)
    }

    fn fwd_args(&self) -> FwdArgs {
        let s = &self.gpu.stream;
        let mut a = FwdArgs {
            q: self.q.view(s),
            k: self.k.view(s),
            v: self.v.view(s),
            o: self.o.view(s),
            lse: self.lse.base(s),
            ..Default::default()
        };
        self.aux.fill(s, &mut a);
        a
    }

    /// The forward and backward kernel variants this problem runs.
    pub fn variants(&self) -> Result<(Variant, Variant)> {
        let a = self.fwd_args();
        let aligned = a.aligned16(self.p.dtype.size());
        Ok((
            variant_for(&self.p, Pass::Fwd, aligned, false)?,
            variant_for(&self.p, Pass::Bwd, aligned, self.deterministic)?,
        ))
    }

    /// Which kernels run, in words: the kernel family, the architecture of the cubins, and per pass the
    /// variant and its tile configuration (the backward's as its module exports it).
    pub fn kernel_path(&self) -> Result<String> {
        let (fv, bv) = self.variants()?;
        let a = self.fwd_args();
        let aligned = a.aligned16(self.p.dtype.size());
        let mut s = if super::fwd_sm90::covers(&self.gpu, &self.p, aligned) {
            let v = super::fwd_sm90::sm90_variant(&self.p)?;
            let bm = super::fwd_sm90::variant_block_m(&v);
            format!(
                "{}; fwd sm90 path {v} [BM {bm} BN {}, {} threads: TMA producer + {} wgmma consumer warpgroups, persistent]",
                kernel_family(&self.gpu.arch, &self.p.tuning),
                super::fwd_sm90::variant_block_n(&v),
                super::fwd_sm90::threads(bm),
                bm / 64
            )
        } else {
            let (bm, bn, warps) = fwd::fwd_tiles(&fv);
            format!(
                "{}; fwd sm80 path {fv} [BM {bm} BN {bn}, {} threads]",
                kernel_family(&self.gpu.arch, &self.p.tuning),
                32 * warps
            )
        };
        if let Some(b) = &self.bwd {
            let (_, aligned) = self.bwd_args(b);
            let bv = if super::bwd_sm90::covers(&self.gpu, &self.p, aligned) {
                super::bwd_sm90::sm90_bwd_variant(&self.p, self.deterministic, false)?
            } else {
                bv
            };
            let m = self.gpu.module(&bv)?;
            match m.bwd_config {
                Some([bm, bn, threads, smem]) => {
                    s += &format!("; bwd {bv} [BM {bm} BN {bn}, {threads} threads, {smem} B smem]")
                }
                None => s += &format!("; bwd {bv}"),
            }
        }
        Ok(s)
    }

    /// Enqueues the forward kernel on the backend's stream (writes o and lse; returns without waiting).
    pub fn forward(&self) -> Result<()> {
        let a = self.fwd_args();
        let aligned = a.aligned16(self.p.dtype.size());
        self.gpu.run("the CUDA forward", || fwd::run(&self.gpu, self.gpu.stream.cu_stream(), &self.p, &a, aligned))
    }

    /// Enqueues the backward kernels on the backend's stream, from the o and lse of the last
    /// [`forward`](Self::forward) (writes dq, dk, dv; returns without waiting). Needs `dout` at creation.
    pub fn backward(&self) -> Result<()> {
        let b = self.bwd.as_ref().ok_or_else(|| {
            Error::invalid("dout", "a dout tensor given to DeviceAttention::new", "none (forward only)")
        })?;
        let s = &self.gpu.stream;
        let (a, aligned) = self.bwd_args(b);
        self.gpu.run("the CUDA backward", || {
            if self.p.seqused_k.is_some() {
                super::launch::zero(b.dk.base(s), b.dk.bytes(), s.cu_stream())?;
                super::launch::zero(b.dv.base(s), b.dv.bytes(), s.cu_stream())?;
            }
            bwd::run(&self.gpu, s, &self.p, &a, aligned, self.deterministic, bwd::Softmax::Whole, None)
        })
    }

    /// Waits until everything enqueued on the backend's stream has run.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.stream.synchronize().map_err(|e| dev_err("running the kernels", e))
    }

    /// Runs `f` (which enqueues work, e.g. [`forward`](Self::forward)) `warmup` times untimed, then `reps`
    /// times between CUDA events recorded on the backend's stream; returns the milliseconds of each timed
    /// run. With `flush_l2`, a 256 MiB buffer is zeroed before every run, outside the events (as triton's
    /// `do_bench`), so no run finds its inputs in the L2 cache.
    pub fn time(
        &mut self,
        warmup: usize,
        reps: usize,
        flush_l2: bool,
        mut f: impl FnMut(&Self) -> Result<()>,
    ) -> Result<Vec<f64>> {
        let gpu = self.gpu.clone();
        let s = gpu.stream.clone();
        gpu.run("timing the kernels", || {
            if flush_l2 && self.flush.is_none() {
                // SAFETY: only ever written (zeroed), never read.
                self.flush =
                    Some(unsafe { s.alloc::<u8>(FLUSH_BYTES) }.map_err(|e| dev_err("allocating the L2 flush", e))?);
            }
            let flush = self.flush.as_ref().filter(|_| flush_l2).map(|b| b.device_ptr(&s).0);
            let do_flush = || match flush {
                Some(ptr) => super::launch::zero(ptr, FLUSH_BYTES, s.cu_stream()),
                None => Ok(()),
            };
            for _ in 0..warmup {
                do_flush()?;
                f(self)?;
            }
            let ev = || gpu.ctx.new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT));
            let mut events = Vec::with_capacity(reps);
            for _ in 0..reps {
                let (e0, e1) = (
                    ev().map_err(|e| dev_err("creating an event", e))?,
                    ev().map_err(|e| dev_err("creating an event", e))?,
                );
                do_flush()?;
                e0.record(&s).map_err(|e| dev_err("recording an event", e))?;
                f(self)?;
                e1.record(&s).map_err(|e| dev_err("recording an event", e))?;
                events.push((e0, e1));
            }
            s.synchronize().map_err(|e| dev_err("running the kernels", e))?;
            events
                .iter()
                .map(|(a, b)| a.elapsed_ms(b).map(f64::from).map_err(|e| dev_err("reading an event", e)))
                .collect()
        })
    }

    /// Enqueues the zeroing of the 256 MiB L2-flush buffer (a no-op before a [`time`](Self::time) call with
    /// `flush_l2` allocated it): for timing a flush together with a run, as triton's `do_bench` estimates.
    pub fn flush_l2(&self) -> Result<()> {
        match &self.flush {
            Some(b) => {
                let s = &self.gpu.stream;
                super::launch::zero(b.device_ptr(s).0, FLUSH_BYTES, s.cu_stream())
            }
            None => Ok(()),
        }
    }

    /// Bytes of the device outputs (o, lse; dq, dk, dv when the backward is enabled).
    pub fn output_bytes(&self, backward: bool) -> usize {
        let mut n = self.o.bytes() + self.lse.bytes();
        if let (true, Some(b)) = (backward, &self.bwd) {
            n += b.dq.bytes() + b.dk.bytes() + b.dv.bytes();
        }
        n
    }
}

/// The kernel family that runs on an architecture under tuning `t`, in words (with the extra NVRTC options of
/// an experiment, if any, so that bench output and JSON say which build ran).
pub fn kernel_family(arch: &str, t: &crate::tuning::Tuning) -> String {
    let sm80 = format!("sm80-class FA2 kernels (mma.sync m16n8k16, ldmatrix, cp.async; NVRTC cubins for {arch})");
    let family = if arch == "sm_90a" && t.sm90_forward_allowed() {
        let tiles = super::fwd_sm90::tile_summary(t);
        format!(
            "sm90 forward (TMA, wgmma, warp-specialized, persistent){tiles} where it covers the problem, else \
             {sm80}"
        )
    } else {
        sm80
    };
    match t.nvrtc_options.as_slice() {
        [] => family,
        extra => format!("{family}; extra NVRTC options {}", extra.join(" ")),
    }
}
