//! The CUDA backend: FlashAttention-2-class kernels (`kernels/*.cu`) compiled at run time by NVRTC for the
//! device's architecture, cached on disk, launched through the CUDA driver API (`cudarc`, loaded
//! dynamically: the crate builds and runs without CUDA, and this backend then reports why it is
//! unavailable instead of panicking).
//!
//! Layers, each using only those above it in this list (no module imports one below it; CI checks the
//! whole crate with `tools/check_import_cycles.py`):
//! - `tiles`: kernel shapes that are pure functions of a head dim; [`compile`]: kernel variants and NVRTC;
//! - [`cache`]: the disk cache; [`runtime`]: probing, one context and stream per device, loaded modules;
//!   `launch`: kernel launches and fills; `tensor`: device memory; `tma`: TMA tensor maps;
//! - [`params`]: the kernels' parameter blocks; `call`: the checks and device pointers of a call, its
//!   forward parameter block and sm80-class variant;
//! - launchers: `fwd_sm90`, `bwd_sm90` (Hopper), then `fwd`, `bwd` (the path choice and the sm80-class
//!   kernels), [`kvcache`]; then the entry points: `framework` (device memory), `resident`, this module.
//!
//! Entry points: [`forward_host`]/[`backward_host`]/[`kvcache_forward_host`] take host tensors (what
//! [`crate::forward_on`] uses); [`forward_raw`]/[`backward_raw`] take a framework's device pointers and
//! stream; [`forward_device`]/[`backward_device`] also take the metadata in device memory and a caller's
//! workspace (no allocation, copy or synchronisation: what PyTorch and CUDA graphs need); [`DeviceAttention`] keeps one problem in device memory and times its kernels (for benchmarks);
//! [`precompile`] fills the cache without a GPU.

/// Test-only: asserts that `$ty` is `$size` bytes with each listed field at its byte offset, as the C ABI lays
/// out the kernels' struct it mirrors on a 64-bit target.
#[cfg(test)]
macro_rules! assert_layout {
    ($ty:ty, size $size:expr, { $($field:ident: $offset:expr),+ $(,)? }) => {
        $(assert_eq!(std::mem::offset_of!($ty, $field), $offset, concat!("offset of ", stringify!($field)));)+
        assert_eq!(std::mem::size_of::<$ty>(), $size, concat!("size of ", stringify!($ty)));
    };
}

pub(crate) mod bwd;
mod bwd_sm90;
pub mod cache;
pub(crate) mod call;
pub mod compile;
mod framework;
mod fwd;
mod fwd_sm90;
pub mod kvcache;
mod launch;
pub mod params;
mod resident;
pub mod runtime;
mod tensor;
mod tiles;
mod tma;

pub use bwd_sm90::sm90_backward_launches;
pub use compile::{KernelUsage, Pass, Variant};
/// The CUDA bindings this backend is built on (for callers of [`forward_raw`] that need a context or a
/// stream, and for tests).
pub use cudarc;
pub use framework::{backward_device, backward_workspace_bytes, forward_device, DeviceMeta, DeviceVarlen};
pub use fwd_sm90::{sm90_forward_launches, sm90_tile};
pub use kvcache::{
    kvcache_forward_host, kvcache_forward_raw, kvcache_plan, DeviceKvCache, DeviceRotary, DeviceWorkspace, KvCall,
    KvCallPlan, KvDecodeBench, KvWorkspace,
};
pub use launch::{poison_outputs, set_poison_outputs};
pub use resident::{kernel_family, DeviceAttention};
pub use tensor::{BackwardTensors, DeviceTensorRef, ForwardTensors};
pub use tiles::{sm90_bwd_head_dim, sm90_head_dim};

use crate::api::{BackwardInputs, ForwardOutput, Gradients};
use crate::dtype::DType;
use crate::error::Result;
use crate::options::AttnOptions;
use crate::problem::{validate, Problem};
use crate::tensor::{BackendStatus, Tensor, TensorView};
use call::{
    check_backward_tensors, check_forward_tensors, poison_forward_outputs, raw_problem, require_half, require_no_dsink,
    Aux, BwdArgs, FwdArgs,
};
use cudarc::driver::CudaStream;
use std::ffi::c_void;
use std::sync::Arc;
use tensor::{alloc_out, download, upload};

/// Which `(d, d_v)` pairs with a value head dim `d_v != d` the CUDA kernels run, and which the KV-cache path
/// runs where, in words (for `flashattn info`).
pub fn value_dim_summary() -> String {
    format!(
        "d_v != d runs where (d, d_v) pads to one of {} (sm80-class forward and backward kernels, on Hopper \
         too); d_v = d everywhere up to {max}. KV caches: the CUDA kernels take d_v = d <= {max} only; the CPU \
         backends take d, d_v up to {kv}, including MLA's (576, 512) with the values the first 512 columns of the \
         key cache (refused on CUDA)",
        tiles::value_dim_pairs_text(),
        max = crate::problem::MAX_HEAD_DIM,
        kv = crate::problem::MAX_KV_HEAD_DIM,
    )
}

/// Whether the CUDA backend can run here, with the devices, driver and NVRTC versions and the cache folder
/// (or the reason it cannot run).
pub fn status() -> BackendStatus {
    let (usable, detail) = match runtime::guard("probing CUDA", || Ok(runtime::describe())) {
        Ok(x) => x,
        Err(e) => (false, e.to_string()),
    };
    BackendStatus { name: "cuda", usable, detail }
}

/// Forward pass of host tensors on CUDA device `n`: uploads q/k/v (keeping their strides), runs the
/// kernel, downloads `o` and `lse`.
pub fn forward_host(n: usize, q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<ForwardOutput> {
    let p = validate(&q.view(), &k.view(), &v.view(), opts)?;
    forward_problem(n, &p, (&q.view(), &k.view(), &v.view()))
}

fn forward_problem(
    n: usize,
    p: &Problem,
    (q, k, v): (&TensorView<'_>, &TensorView<'_>, &TensorView<'_>),
) -> Result<ForwardOutput> {
    require_half(p)?;
    let gpu = runtime::gpu(n)?;
    let s = &gpu.stream;
    gpu.run("the CUDA forward", || {
        let (dq, dk, dv) =
            (upload(s, q.data, &q.layout)?, upload(s, k.data, &k.layout)?, upload(s, v.data, &v.layout)?);
        let poisoned = launch::poison_outputs(&p.tuning);
        let o = alloc_out(s, &p.o_shape(), p.out_dtype, poisoned)?;
        let lse = alloc_out(s, &p.lse_shape(), DType::F32, poisoned)?;
        let aux = Aux::upload(s, p)?;
        let mut a = FwdArgs {
            q: dq.view(s),
            k: dk.view(s),
            v: dv.view(s),
            o: o.view(s),
            lse: lse.base(s),
            ..Default::default()
        };
        aux.fill(s, &mut a);
        let aligned = a.aligned16(p.dtype.size());
        fwd::run(&gpu, s.cu_stream(), p, &a, aligned)?;
        let out = ForwardOutput { o: download(s, &o)?, lse: download(s, &lse)? };
        drop((dq, dk, dv, aux));
        Ok(out)
    })
}

/// Backward pass of host tensors on CUDA device `n` (deterministic when `opts.deterministic`).
pub fn backward_host(n: usize, x: &BackwardInputs<&Tensor>, opts: &AttnOptions) -> Result<Gradients> {
    let &BackwardInputs { q, k, v, o, lse, dout } = x;
    let p = validate(&q.view(), &k.view(), &v.view(), opts)?;
    require_half(&p)?;
    crate::problem::check_backward_inputs(&p, &o.view(), &lse.view(), &dout.view())?;
    let gpu = runtime::gpu(n)?;
    let s = &gpu.stream;
    gpu.run("the CUDA backward", || {
        let up = |t: &Tensor| upload(s, t.view().data, t.layout());
        let (tq, tk, tv, to, tdo) = (up(q)?, up(k)?, up(v)?, up(o)?, up(dout)?);
        let lse_c = Tensor::from_f32(&lse.to_f32_vec(), lse.shape(), DType::F32)?;
        let tlse = up(&lse_c)?;
        let poisoned = launch::poison_outputs(&p.tuning);
        let gq = alloc_out(s, q.shape(), p.dtype, poisoned)?;
        let gk = alloc_out(s, k.shape(), p.dtype, poisoned)?;
        let gv = alloc_out(s, v.shape(), p.dtype, poisoned)?;
        if p.seqused_k.is_some() {
            // Keys past seqused_k get no gradient.
            launch::zero(gk.base(s), gk.bytes(), s.cu_stream())?;
            launch::zero(gv.base(s), gv.bytes(), s.cu_stream())?;
        }
        let aux = Aux::upload(s, &p)?;
        // The sink's gradient in f32 on the device, returned in the sink's dtype.
        let gsink = p.sink.as_ref().map(|_| alloc_out(s, &[p.h], DType::F32, poisoned)).transpose()?;
        let mut a = BwdArgs {
            fwd: FwdArgs {
                q: tq.view(s),
                k: tk.view(s),
                v: tv.view(s),
                o: to.view(s),
                lse: tlse.view(s).ptr,
                ..Default::default()
            },
            dout: tdo.view(s),
            dq: gq.view(s),
            dk: gk.view(s),
            dv: gv.view(s),
            dsink: gsink.as_ref().map_or(0, |t| t.base(s)),
            grad_f32: false,
        };
        aux.fill(s, &mut a.fwd);
        let aligned = a.aligned16(p.dtype.size());
        bwd::run(&gpu, s, &p, &a, aligned, opts.deterministic, bwd::Softmax::Whole, None)?;
        let dsink = match (&gsink, &opts.sink) {
            (Some(g), Some(sink)) => Some(Tensor::from_f32(&download(s, g)?.to_f32_vec(), &[p.h], sink.dtype())?),
            _ => None,
        };
        let g = Gradients { dq: download(s, &gq)?, dk: download(s, &gk)?, dv: download(s, &gv)?, dsink };
        drop((tq, tk, tv, to, tdo, tlse, aux, gsink));
        Ok(g)
    })
}

/// Forward pass over device memory the caller owns (for frameworks such as candle or PyTorch), on the
/// caller's stream. `o` is written with its own strides; `lse` must be contiguous `f32` of shape
/// `[b, h, sq]` (varlen: `[h, total_q]`). Varlen offsets and ALiBi slopes come from `opts` (host) and are
/// copied to the device on `stream`.
///
/// # Safety
/// Every pointer must be device memory of CUDA device `n` (primary context) covering its shape and strides,
/// `stream` must be a valid stream of that context or null (the legacy default stream), and the caller
/// must keep the memory alive and unaliased (outputs) until the stream has run the kernels.
pub unsafe fn forward_raw(n: usize, stream: *mut c_void, t: ForwardTensors<'_>, opts: &AttnOptions) -> Result<()> {
    let p = raw_problem(t.q, t.k, t.v, opts)?;
    check_forward_tensors(&p, &t)?;
    // SAFETY: the caller's contract.
    unsafe {
        raw_call(n, stream, &p, "the CUDA forward", |gpu, s, aux| {
            let mut a = FwdArgs::of(&t);
            aux.fill(s, &mut a);
            poison_forward_outputs(&p, &t, s.cu_stream())?;
            fwd::run(gpu, s.cu_stream(), &p, &a, a.aligned16(p.dtype.size()))
        })
    }
}

/// Backward pass over device memory the caller owns, on the caller's stream. `lse` is contiguous `f32`;
/// `dq`/`dk`/`dv` are written with their own strides (rows past `seqused_k` are not written). A learnable sink
/// is refused (its gradient needs [`backward_device`]), so `t.dsink` must be `None`.
///
/// # Safety
/// As for [`forward_raw`].
pub unsafe fn backward_raw(n: usize, stream: *mut c_void, t: BackwardTensors<'_>, opts: &AttnOptions) -> Result<()> {
    backward_raw_of(n, stream, t, opts, bwd::Softmax::Whole)
}

/// [`backward_raw`] with the owner of `lse` named: [`bwd::Softmax::Part`] for a call that holds part of each
/// row's keys, with `o` and `lse` (and so `D`) of the whole softmax (ring attention), where no row may take the
/// one-key shortcut.
///
/// # Safety
/// As for [`forward_raw`].
pub(crate) unsafe fn backward_raw_of(
    n: usize,
    stream: *mut c_void,
    t: BackwardTensors<'_>,
    opts: &AttnOptions,
    softmax: bwd::Softmax,
) -> Result<()> {
    let p = raw_problem(t.fwd.q, t.fwd.k, t.fwd.v, opts)?;
    require_no_dsink(&p)?;
    check_backward_tensors(&p, &t)?;
    // SAFETY: the caller's contract.
    unsafe {
        raw_call(n, stream, &p, "the CUDA backward", |gpu, s, aux| {
            let mut a = BwdArgs::of(&t);
            aux.fill(s, &mut a.fwd);
            bwd::run(gpu, s, &p, &a, a.aligned16(p.dtype.size()), opts.deterministic, softmax, None)
        })
    }
}

/// The frame of a raw call on device `n`: its context bound, the caller's `stream` borrowed, and the problem's
/// small host inputs ([`Aux`]: varlen offsets, ALiBi slopes, the sink) uploaded on it and kept until `launch` has
/// enqueued the kernels that read them.
///
/// # Safety
/// `stream` is a stream of device `n`'s primary context, or null.
unsafe fn raw_call(
    n: usize,
    stream: *mut c_void,
    p: &Problem,
    what: &str,
    launch: impl FnOnce(&runtime::Gpu, &Arc<CudaStream>, &Aux) -> Result<()>,
) -> Result<()> {
    let gpu = runtime::gpu(n)?;
    gpu.run(what, || {
        // SAFETY: the caller's contract.
        let s = unsafe { gpu.borrowed_stream(stream) };
        let aux = Aux::upload(&s, p)?;
        launch(&gpu, &s, &aux)?;
        drop(aux);
        Ok(())
    })
}

/// What [`precompile_variants`] did for one variant and architecture.
#[derive(Debug, Clone)]
pub struct PrecompileReport {
    /// The variant.
    pub variant: Variant,
    /// The architecture (`sm_80`, ...).
    pub arch: String,
    /// Whether it was already in the cache.
    pub cached: bool,
    /// Seconds spent (compiling, or reading the cache).
    pub seconds: f64,
    /// Registers, spills and wgmma serialisation per kernel.
    pub usage: Vec<KernelUsage>,
}

impl std::fmt::Display for PrecompileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.arch, self.variant)?;
        for u in &self.usage {
            write!(f, " {}: {} regs", u.kernel, u.registers)?;
            if u.spills() {
                write!(f, " SPILLS {}/{} B", u.spill_stores, u.spill_loads)?;
            }
            if u.wgmma_serialized {
                write!(f, " WGMMA SERIALIZED")?;
            }
            write!(f, ";")?;
        }
        write!(f, " {} {:.2} s", if self.cached { "cached" } else { "compiled" }, self.seconds)
    }
}

/// Compiles `variants` for each of `archs` with NVRTC (no GPU needed), in parallel, filling the cache.
pub fn precompile_variants(archs: &[String], variants: &[Variant]) -> Result<Vec<PrecompileReport>> {
    compile_jobs(archs, variants, false)
}

/// Compiles the given variants for the given architectures with ptxas really running (no cache of ours
/// or of NVRTC's: [`compile::compile_fresh`]), no GPU needed; one report per variant and architecture with
/// registers, spills and wgmma serialisation. For the register and spill checks.
pub fn compile_reports(archs: &[String], variants: &[Variant]) -> Result<Vec<PrecompileReport>> {
    compile_jobs(archs, variants, true)
}

/// Every (architecture, variant) pair that builds, compiled in parallel: through the disk cache, or fresh.
fn compile_jobs(archs: &[String], variants: &[Variant], fresh: bool) -> Result<Vec<PrecompileReport>> {
    use rayon::prelude::*;
    compile::nvrtc_version()?;
    let archs: Vec<String> = archs.iter().map(|a| compile::canonical_arch(a)).collect::<Result<_>>()?;
    let jobs: Vec<(String, Variant)> =
        archs.iter().flat_map(|a| variants.iter().filter(|v| v.builds_for(a)).map(move |v| (a.clone(), *v))).collect();
    jobs.par_iter()
        .map(|(arch, v)| {
            let t0 = std::time::Instant::now();
            let (c, cached) = if fresh {
                (compile::compile_fresh(v, arch)?, false)
            } else {
                let (c, origin) = cache::get_or_compile(v, arch)?;
                (c, origin == cache::Origin::Disk)
            };
            Ok(PrecompileReport {
                variant: *v,
                arch: arch.clone(),
                cached,
                seconds: t0.elapsed().as_secs_f64(),
                usage: compile::parse_usage(&c.log)
                    .into_iter()
                    .filter(|u| !u.kernel.starts_with(compile::FRESH_KERNEL_PREFIX))
                    .collect(),
            })
        })
        .collect()
}

/// Compiles every kernel variant for the given architectures (e.g. `sm_80`, `sm_90a`) into the cache, with
/// no GPU needed; returns one line per variant with its registers and spills.
pub fn precompile(archs: &[String]) -> Result<Vec<String>> {
    Ok(precompile_variants(archs, &compile::all_variants())?.iter().map(|r| r.to_string()).collect())
}

/// How long the last load of a variant on device `n` took and whether it came from the disk cache
/// (`None` if not loaded): for measuring compile and cache-load times.
pub fn load_info(n: usize, v: &Variant) -> Result<(std::time::Duration, bool)> {
    let gpu = runtime::gpu(n)?;
    let m = gpu.module(v)?;
    Ok((m.load_time, m.origin == cache::Origin::Disk))
}

/// The architecture kernels are compiled for on device `n` (`sm_80`, `sm_90a`, ...).
pub fn device_arch(n: usize) -> Result<String> {
    Ok(runtime::gpu(n)?.arch.clone())
}

/// The sm80-class forward and backward kernel variants a problem runs on (`aligned16`: every tensor's address
/// and strides are multiples of 16 bytes), with the compile-time tuning of the problem's options.
pub fn variants_for(p: &Problem, aligned16: bool, deterministic: bool) -> Result<(Variant, Variant)> {
    Ok((call::variant_for(p, Pass::Fwd, aligned16, false)?, call::variant_for(p, Pass::Bwd, aligned16, deterministic)?))
}

/// Loads variant `v` on device `n` outside the in-memory module map, timing the whole first-call path:
/// the disk cache (or NVRTC when the entry is missing) and the module load. Returns the time and whether
/// the cubin came from the disk cache.
pub fn measure_load(n: usize, v: &Variant) -> Result<(std::time::Duration, bool)> {
    let gpu = runtime::gpu(n)?;
    let t0 = std::time::Instant::now();
    let (c, origin) = cache::get_or_compile(v, &gpu.arch)?;
    gpu.run("loading a module", || {
        let m = gpu
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin))
            .map_err(|e| runtime::dev_err("loading a module", e))?;
        for name in v.entry_points() {
            m.load_function(name).map_err(|e| runtime::dev_err("loading a kernel", e))?;
        }
        Ok(())
    })?;
    Ok((t0.elapsed(), origin == cache::Origin::Disk))
}
