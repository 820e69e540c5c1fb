//! KV-cache attention on the GPU (`kernels/kvcache.cu`): the append of new keys/values (with rotary) runs
//! in a kernel, in place in the (paged) cache; attention reads K/V straight from the cache, with the query
//! heads of each key/value head folded into one query tile, split over the keys when the batch is too small
//! to fill the GPU (f32 partial results and their LSE, merged by the last split of each query tile to finish:
//! one kernel, no second launch).
//!
//! Two entry points:
//! - [`kvcache_forward_host`] (what [`crate::kvcache_forward_on`] uses for `Device::Cuda`): host tensors,
//!   validated on the host exactly as the CPU path ([`crate::kvcache::check`]: same typed errors, an
//!   overflowing append is refused before anything is written), uploaded, run, and the cache written back.
//! - [`kvcache_forward_raw`]: device memory the caller owns, the caller's stream and a caller-provided
//!   workspace ([`DeviceWorkspace`]): no allocation, no synchronisation, so it can be captured in a CUDA
//!   graph. Values that live on the device (`cache_seqlens`, the block table, ...) are checked by the
//!   kernels: an append that would overflow (or any out-of-range value) sets the workspace's status word
//!   and nothing is written; read it with [`KvWorkspace::status`].

use super::call::refuse_host_input;
use super::compile::{kv_variant, padded_head_dim, Variant};
use super::launch::{launch, poison, poison_outputs};
use super::runtime::{self, dev_err, Gpu, Loaded};
use super::tensor::{alloc_out, download, upload, upload_vec, DevTensor, DevView, DeviceTensorRef};
use crate::api::ForwardOutput;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kvcache::{KvCache, Values};
use crate::options::AttnOptions;
use crate::problem::{check_finite_scale, check_softcap};
use crate::semantics::Mask;
use crate::tensor::{CpuSliceMut, TensorView};
use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// The default pipeline depth of the KV-cache kernel (defined with the other head-dim shapes in `tiles.rs`).
pub use super::tiles::default_stages;

/// Warps of `kv_attn` (`KV_WARPS`).
const KV_WARPS: u32 = 4;
/// Warps of `kv_append` (`KV_APPEND_WARPS`).
const APPEND_WARPS: u32 = 4;
/// Most key splits.
pub const MAX_SPLITS: usize = 128;

/// Mirror of `KvParams` in `kvcache.cu` (pointers and 64-bit fields first, then 32-bit ones).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KvParams {
    q: *const c_void,
    k_cache: *mut c_void,
    v_cache: *mut c_void,
    k_new: *const c_void,
    v_new: *const c_void,
    o: *mut c_void,
    lse: *mut f32,
    cache_seqlens: *const i32,
    block_table: *const i32,
    cache_batch_idx: *const i32,
    cache_leftpad: *const i32,
    rot_cos: *const f32,
    rot_sin: *const f32,
    alibi: *const f32,
    q_rot: *mut c_void,
    o_part: *mut f32,
    lse_part: *mut f32,
    status: *mut i32,
    split_count: *mut i32,
    sink: *const f32,
    k_descale: *const f32,
    v_descale: *const f32,
    q_strides: [i64; 3],
    kc_strides: [i64; 3],
    vc_strides: [i64; 3],
    kn_strides: [i64; 3],
    vn_strides: [i64; 3],
    o_strides: [i64; 3],
    bt_stride: i64,
    rot_stride: i64,
    alibi_batch_stride: i64,
    b: i32,
    h: i32,
    hk: i32,
    sq: i32,
    s_new: i32,
    d: i32,
    seqlen_all: i32,
    capacity: i32,
    cache_rows: i32,
    page_size: i32,
    max_pages: i32,
    rot_half: i32,
    rot_rows: i32,
    rot_interleaved: i32,
    rot_q_per_token: i32,
    num_splits: i32,
    scale: f32,
    softcap: f32,
    window_left: i32,
    window_right: i32,
}

/// Mirror of `KvFillParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KvFillParams {
    dst: *mut c_void,
    n: i64,
    seed: u32,
    e4m3: i32,
}

/// Dynamic shared memory of `kv_attn` (`KV_SMEM_BYTES`) with `stages` pipeline stages, over 16-bit or (`fp8`)
/// e4m3 caches.
fn attn_smem(head_dim: usize, stages: u32, fp8: bool) -> u32 {
    // KV_ROW_BYTES: unpadded swizzled rows when the head dim is a multiple of 64, else one spare chunk per row.
    let rb = if head_dim % 64 == 0 { head_dim as u32 * 2 } else { (head_dim as u32 / 8 + 1) * 16 };
    // KV_WARP_RING_BYTES: the stages of 16-bit K/V rows, or of 1-byte rows plus one widened 16-bit K/V tile.
    let ring = if fp8 { stages * 32 * head_dim as u32 + 32 * rb } else { stages * 32 * rb };
    16 * rb + KV_WARPS * ring + KV_WARPS * 32 * 4
}

/// The number of key splits: the smallest count whose wave efficiency is at least 95% of the best, as long
/// as every warp of a split still gets a block of 16 keys (at most [`MAX_SPLITS`]). A looser threshold leaves
/// CTA slots idle on the last wave, which costs bandwidth at large caches (the measurements behind the
/// threshold: docs/notes/cuda-decode.md).
pub fn choose_splits(ctas: usize, max_keys: usize, sms: usize, ctas_per_sm: usize) -> usize {
    let slots = (sms * ctas_per_sm).max(1);
    let key_blocks = max_keys.div_ceil(16);
    let most = (key_blocks / KV_WARPS as usize).clamp(1, MAX_SPLITS);
    if ctas == 0 || ctas * 5 >= slots * 4 || most == 1 {
        return 1;
    }
    let eff = |s: usize| {
        let waves = (ctas * s) as f64 / slots as f64;
        waves / waves.ceil()
    };
    let best = (1..=most).map(eff).fold(0.0, f64::max);
    (1..=most).find(|&s| eff(s) >= 0.95 * best).unwrap_or(1)
}

/// Byte offsets in a call's workspace: the status word at 0, then (when the keys are split) the query tiles'
/// arrival counters, the partial LSE and O, then the rotated q (with rotary), and the total size.
#[derive(Debug, Clone, Copy)]
struct WorkspaceLayout {
    split_count: usize,
    lse_part: usize,
    o_part: usize,
    q_rot: usize,
    bytes: usize,
}

/// Caller-provided device memory for [`kvcache_forward_raw`]: `bytes` at `ptr` (256-byte aligned), all zero
/// before the first call ([`KvWorkspace::new`] does so). The first 4 bytes are the status word; the kernels
/// leave the split counters that follow it at zero after every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceWorkspace {
    /// Device address.
    pub ptr: u64,
    /// Size in bytes.
    pub bytes: usize,
}

/// A workspace owned by the backend (allocated and zeroed once; reuse it for every call of one shape).
pub struct KvWorkspace {
    gpu: Arc<Gpu>,
    buf: CudaSlice<u8>,
}

impl KvWorkspace {
    /// Allocates `bytes` (see [`KvCallPlan::workspace_bytes`]) zeroed bytes on device `n`.
    pub fn new(n: usize, bytes: usize) -> Result<KvWorkspace> {
        let gpu = runtime::gpu(n)?;
        gpu.run("allocating the KV workspace", || {
            let buf = gpu.stream.alloc_zeros::<u8>(bytes.max(256)).map_err(|e| dev_err("allocating", e))?;
            gpu.stream.synchronize().map_err(|e| dev_err("zeroing the workspace", e))?;
            Ok(KvWorkspace { gpu: gpu.clone(), buf })
        })
    }
    /// The device range, for [`kvcache_forward_raw`].
    pub fn as_device(&self) -> DeviceWorkspace {
        DeviceWorkspace { ptr: self.buf.device_ptr(&self.gpu.stream).0, bytes: self.buf.len() }
    }
    /// Reads the status word (waits for the device): 0 = every call so far was fine; bit 1 = a call was
    /// refused (an append would overflow a sequence's capacity, or `cache_seqlens`, `cache_leftpad`,
    /// `cache_batch_idx` or the rotary table length were out of range) and wrote nothing; bit 2 = a block
    /// table entry was out of range (that row was skipped). Sticky: while non-zero, every call returns at
    /// once without writing; [`clear_status`](Self::clear_status) resets it.
    pub fn status(&self) -> Result<i32> {
        self.gpu.run("reading the KV status", || {
            self.gpu.ctx.synchronize().map_err(|e| dev_err("running the kernels", e))?;
            let mut w = [0u8; 4];
            self.gpu.stream.memcpy_dtoh(&self.buf.slice(0..4), &mut w[..]).map_err(|e| dev_err("reading", e))?;
            self.gpu.stream.synchronize().map_err(|e| dev_err("reading", e))?;
            Ok(i32::from_le_bytes(w))
        })
    }
    /// Resets the status word to 0.
    pub fn clear_status(&self) -> Result<()> {
        runtime::guard("clearing the KV status", || {
            super::launch::zero(self.buf.device_ptr(&self.gpu.stream).0, 4, self.gpu.stream.cu_stream())?;
            self.gpu.stream.synchronize().map_err(|e| dev_err("clearing", e))
        })
    }
}

/// Rotary tables in device memory: `cos`, `sin` are `f32` `[s_ro, rot / 2]` (last dim contiguous).
#[derive(Debug, Clone)]
pub struct DeviceRotary {
    /// Cosines.
    pub cos: DeviceTensorRef,
    /// Sines.
    pub sin: DeviceTensorRef,
    /// Interleaved pairs `(0,1), (2,3), ...`; otherwise `(k, k + rot/2)`.
    pub interleaved: bool,
}

/// A KV cache in device memory (the device twin of [`KvCache`]); every tensor is device memory of the
/// same device. `i32` vectors are `[b]`.
#[derive(Debug, Clone)]
pub struct DeviceKvCache {
    /// `[b_cache, s_cache, hk, d]`, or `[num_pages, page_size, hk, d]` with a block table; written in place.
    pub k_cache: DeviceTensorRef,
    /// Same shape as `k_cache`, in memory of its own. A view of `k_cache`'s first columns (the same address and
    /// strides: multi-head latent attention's key-prefix values, which the CPU backends run) is refused as
    /// `Unsupported`.
    pub v_cache: DeviceTensorRef,
    /// `[b, s_new, hk, d]`, appended at `cache_seqlens`.
    pub k_new: Option<DeviceTensorRef>,
    /// As `k_new`.
    pub v_new: Option<DeviceTensorRef>,
    /// `i32` `[b]`: tokens already in the cache.
    pub cache_seqlens: DeviceTensorRef,
    /// `i32` `[b, max_pages]`: paged cache.
    pub block_table: Option<DeviceTensorRef>,
    /// `i32` `[b]` (not with paging).
    pub cache_batch_idx: Option<DeviceTensorRef>,
    /// `i32` `[b]` (not with paging).
    pub cache_leftpad: Option<DeviceTensorRef>,
    /// Rotary embedding of the new keys and of q.
    pub rotary: Option<DeviceRotary>,
    /// ALiBi slopes, `f32` `[h]` or `[b, h]` (instead of `AttnOptions::alibi_slopes`, which is host memory).
    pub alibi_slopes: Option<DeviceTensorRef>,
    /// Learnable sink logits, `f32` `[h]` contiguous (instead of `AttnOptions::sink`, which is host memory).
    pub sink: Option<DeviceTensorRef>,
    /// With `e4m3` caches: the key descales, `f32` `[b, hk]` contiguous (1 when absent; instead of
    /// `AttnOptions::k_descale`, which is host memory).
    pub k_descale: Option<DeviceTensorRef>,
    /// With `e4m3` caches: the value descales, as `k_descale`.
    pub v_descale: Option<DeviceTensorRef>,
}

/// Everything a launch needs besides the pointers: shapes, variant, grid.
#[derive(Debug, Clone)]
struct Plan {
    b: usize,
    h: usize,
    hk: usize,
    sq: usize,
    s_new: usize,
    d: usize,
    head_dim: usize,
    dtype: DType,
    /// The caches hold `e4m3` (q, the new rows and o are `dtype`).
    fp8: bool,
    capacity: usize,
    cache_rows: usize,
    page_size: usize,
    max_pages: usize,
    splits: usize,
    rotary: bool,
    scale: f32,
    softcap: f32,
    mask: Mask,
    /// The longest key range the kernels may see (for the window clamp).
    max_keys: usize,
    /// The compile-time tuning of the call's kernels (stage override, extra NVRTC options), as a variant whose
    /// flags [`variant`] fills in.
    tuned: Variant,
}

impl Plan {
    fn m_blocks(&self) -> usize {
        (self.sq * (self.h / self.hk.max(1))).div_ceil(16)
    }
    fn workspace(&self) -> WorkspaceLayout {
        let al = |x: usize| x.div_ceil(256) * 256;
        let split = self.splits > 1;
        let rows = self.b * self.h * self.sq;
        let split_count = 256;
        let lse_part = split_count + if split { al(self.b * self.hk * self.m_blocks() * 4) } else { 0 };
        let o_part = lse_part + if split { al(self.splits * rows * 4) } else { 0 };
        let q_rot = o_part + if split { al(self.splits * rows * self.head_dim * 4) } else { 0 };
        let bytes = q_rot + if self.rotary { al(rows * self.head_dim * 2) } else { 0 };
        WorkspaceLayout { split_count, lse_part, o_part, q_rot, bytes }
    }
}

fn window(side: Option<usize>, limit: usize) -> i32 {
    match side {
        Some(w) if w < limit => w as i32,
        _ => -1,
    }
}

#[allow(clippy::too_many_arguments)]
fn make_plan(
    gpu: &Gpu,
    dtype: DType,
    cache_dtype: DType,
    [b, sq, h, d]: [usize; 4],
    hk: usize,
    s_new: usize,
    cache_shape: &[usize],
    max_pages: Option<usize>,
    rotary: bool,
    max_keys: usize,
    opts: &AttnOptions,
) -> Result<Plan> {
    match dtype {
        DType::F16 | DType::BF16 => {}
        other => return Err(super::call::unsupported_dtype(other)),
    }
    let fp8 = cache_dtype == DType::E4M3;
    if !fp8 && cache_dtype != dtype {
        return Err(Error::invalid("k_cache", format!("dtype {dtype} (as q) or e4m3"), cache_dtype));
    }
    if fp8 && !super::compile::arch_at_least(&gpu.arch, 89) {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!("e4m3 KV caches on {} (they need sm_89 or newer)", gpu.arch),
        });
    }
    let head_dim = padded_head_dim(d).ok_or_else(|| Error::invalid("q", "head dim <= 256", d))?;
    let scale = check_finite_scale(opts.softmax_scale, d)?;
    let softcap = check_softcap(opts.softcap)?;
    let mask = Mask::new(opts.causal, opts.window)?;
    if !(softcap > 0.0 || opts.alibi_slopes.is_some()) && scale <= 0.0 {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!("softmax_scale {scale} (the kernels need a positive scale)"),
        });
    }
    let big = [b, h, sq, s_new, d, max_keys].iter().any(|&x| x > (i32::MAX / 4) as usize)
        || b * hk > 65535
        || cache_shape.iter().any(|&x| x > (i32::MAX / 4) as usize);
    if big {
        return Err(Error::Unsupported { backend: "cuda", what: "batch, heads or cache lengths this large".into() });
    }
    let (capacity, cache_rows, page_size, max_pages) = match max_pages {
        Some(mp) => (mp * cache_shape[1], cache_shape[0], cache_shape[1], mp),
        None => (cache_shape[1], cache_shape[0], 0, 0),
    };
    let mut plan = Plan {
        b,
        h,
        hk,
        sq,
        s_new,
        d,
        head_dim,
        dtype,
        fp8,
        capacity,
        cache_rows,
        page_size,
        max_pages,
        splits: 1,
        rotary,
        scale,
        softcap,
        mask,
        max_keys,
        tuned: kv_variant(head_dim, dtype == DType::BF16, false, false, false, true).tuned(&opts.tuning),
    };
    // One CTA per SM: a second resident CTA of the same stream of keys adds no bandwidth, and more splits cost a
    // CTA ramp and partial rows each (H100, docs/notes/cuda-decode.md item 19).
    plan.splits = match opts.tuning.num_splits {
        0 => choose_splits(b * hk * plan.m_blocks(), max_keys, gpu.sm_count, 1),
        n => n.clamp(1, MAX_SPLITS),
    };
    Ok(plan)
}

/// Device pointers of one call.
#[derive(Debug, Clone, Copy, Default)]
struct Ptrs {
    q: DevView,
    kc: DevView,
    vc: DevView,
    kn: DevView,
    vn: DevView,
    o: DevView,
    lse: u64,
    seqlens: u64,
    block_table: u64,
    bt_stride: i64,
    batch_idx: u64,
    leftpad: u64,
    cos: u64,
    sin: u64,
    rot_stride: i64,
    rot_rows: usize,
    rot_half: usize,
    interleaved: bool,
    alibi: u64,
    alibi_per_batch: bool,
    /// Learnable sink logits `f32 [h]` or 0.
    sink: u64,
    /// `e4m3` caches: descales `f32 [b, hk]` or 0.
    k_descale: u64,
    v_descale: u64,
    ws: u64,
}

/// The kernel variant of a call.
fn variant(pl: &Plan, x: &Ptrs) -> Variant {
    let cache_elem = if pl.fp8 { 1 } else { 2 };
    let aligned = [x.kc, x.vc].iter().all(|v| v.aligned16(cache_elem)) && (pl.rotary || x.q.aligned16(2));
    let v =
        kv_variant(pl.head_dim, pl.dtype == DType::BF16, pl.mask.is_active(), x.alibi != 0, pl.softcap > 0.0, aligned);
    Variant { kv_stages: pl.tuned.kv_stages, nvrtc: pl.tuned.nvrtc, kv_fp8: pl.fp8, ..v }
}

/// Enqueues the kernels of one call on `stream` (no allocation, no synchronisation).
fn enqueue(gpu: &Gpu, stream: dsys::CUstream, pl: &Plan, x: &Ptrs) -> Result<()> {
    let m = gpu.module(&variant(pl, x))?;
    enqueue_with(gpu, &m, stream, pl, x)
}

fn enqueue_with(gpu: &Gpu, m: &Loaded, stream: dsys::CUstream, pl: &Plan, x: &Ptrs) -> Result<()> {
    let ws = pl.workspace();
    let at = |off: usize| x.ws + off as u64;
    let limit = pl.sq + pl.max_keys + 1;
    let p = KvParams {
        q: x.q.ptr as *const c_void,
        k_cache: x.kc.ptr as *mut c_void,
        v_cache: x.vc.ptr as *mut c_void,
        k_new: x.kn.ptr as *const c_void,
        v_new: x.vn.ptr as *const c_void,
        o: x.o.ptr as *mut c_void,
        lse: x.lse as *mut f32,
        cache_seqlens: x.seqlens as *const i32,
        block_table: x.block_table as *const i32,
        cache_batch_idx: x.batch_idx as *const i32,
        cache_leftpad: x.leftpad as *const i32,
        rot_cos: x.cos as *const f32,
        rot_sin: x.sin as *const f32,
        alibi: x.alibi as *const f32,
        q_rot: at(ws.q_rot) as *mut c_void,
        o_part: at(ws.o_part) as *mut f32,
        lse_part: at(ws.lse_part) as *mut f32,
        status: x.ws as *mut i32,
        split_count: at(ws.split_count) as *mut i32,
        sink: x.sink as *const f32,
        k_descale: x.k_descale as *const f32,
        v_descale: x.v_descale as *const f32,
        q_strides: [x.q.batch, x.q.row, x.q.head],
        kc_strides: [x.kc.batch, x.kc.row, x.kc.head],
        vc_strides: [x.vc.batch, x.vc.row, x.vc.head],
        kn_strides: [x.kn.batch, x.kn.row, x.kn.head],
        vn_strides: [x.vn.batch, x.vn.row, x.vn.head],
        o_strides: [x.o.batch, x.o.row, x.o.head],
        bt_stride: x.bt_stride,
        rot_stride: x.rot_stride,
        alibi_batch_stride: if x.alibi_per_batch { pl.h as i64 } else { 0 },
        b: pl.b as i32,
        h: pl.h as i32,
        hk: pl.hk as i32,
        sq: pl.sq as i32,
        s_new: pl.s_new as i32,
        d: pl.d as i32,
        seqlen_all: 0,
        capacity: pl.capacity as i32,
        cache_rows: pl.cache_rows as i32,
        page_size: pl.page_size as i32,
        max_pages: pl.max_pages as i32,
        rot_half: if pl.rotary { x.rot_half as i32 } else { 0 },
        rot_rows: x.rot_rows as i32,
        rot_interleaved: x.interleaved as i32,
        rot_q_per_token: pl.mask.is_active() as i32,
        num_splits: pl.splits as i32,
        scale: pl.scale,
        softcap: pl.softcap,
        window_left: if pl.mask.is_active() { window(pl.mask.left, limit) } else { -1 },
        window_right: if pl.mask.is_active() { window(pl.mask.right, limit) } else { -1 },
    };
    if pl.b == 0 || pl.h == 0 || pl.sq == 0 {
        return Ok(());
    }
    // SAFETY: `p` mirrors KvParams; its pointers come from buffers validated for this plan.
    unsafe {
        if pl.s_new > 0 {
            let rows = 2 * pl.s_new * pl.hk + if pl.rotary { pl.sq * pl.h } else { 0 };
            let grid = ((rows as u32).div_ceil(APPEND_WARPS), pl.b as u32, 1);
            launch(&m.kernels["kv_append"], "kv_append", stream, grid, 32 * APPEND_WARPS, 0, &p)?;
        }
        let grid = (pl.splits as u32, pl.m_blocks() as u32, (pl.b * pl.hk) as u32);
        let smem = attn_smem(pl.head_dim, pl.tuned.stages(), pl.fp8);
        if smem as i64 > gpu.smem_optin as i64 {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: format!("head dim {} needs {smem} B of shared memory ({} available)", pl.d, gpu.smem_optin),
            });
        }
        launch(&m.kernels["kv_attn"], "kv_attn", stream, grid, 32 * KV_WARPS, smem, &p)?;
    }
    Ok(())
}

/// KV-cache attention of host tensors on CUDA device `n`: validated on the host (the same checks and typed
/// errors as the CPU path; an overflowing append is refused before anything is written), then the cache,
/// q and the new rows are uploaded, the append (with rotary) and attention run on the device, and the
/// cache's appended state is copied back into `cache`.
pub fn kvcache_forward_host(
    n: usize,
    q: &TensorView<'_>,
    cache: &mut KvCache<'_>,
    opts: &AttnOptions,
) -> Result<ForwardOutput> {
    let c = crate::kvcache::check(q, cache, opts)?;
    let p = &c.problem;
    super::call::require_kv_kernel_dims(p.d, p.d_v, cache.key_prefix())?;
    // e4m3 caches run with a 16-bit q (and new rows) whose dtype the output keeps; an e4m3 q does not.
    let q_dtype = q.dtype();
    if q_dtype.is_fp8() {
        return Err(super::call::unsupported_dtype(q_dtype));
    }
    if p.out_dtype != q_dtype {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!("out_dtype {} with a {q_dtype} q (the output keeps q's dtype)", p.out_dtype),
        });
    }
    let gpu = runtime::gpu(n)?;
    let max_pages = p.k.paged.as_ref().map(|pg| pg.max_pages);
    let plan = make_plan(
        &gpu,
        q_dtype,
        cache.k_cache.dtype(),
        [p.batch, p.dense_sq, p.h, p.d],
        p.hk,
        c.s_new,
        cache.k_cache.shape(),
        max_pages,
        c.rot.is_some(),
        p.max_seqlen_k(),
        opts,
    )?;
    let s = gpu.stream.clone();
    gpu.run("the CUDA KV-cache forward", || {
        let tq = upload(&s, q.data, &q.layout)?;
        let tkc = upload(&s, cache.k_cache.as_view().data, &cache.k_cache.layout)?;
        let vc = cache.v_view()?;
        let tvc = upload(&s, vc.data, &vc.layout)?;
        let new = |t: &Option<TensorView<'_>>| t.as_ref().map(|t| upload(&s, t.data, &t.layout)).transpose();
        let (tkn, tvn) = (new(&cache.k_new)?, new(&cache.v_new)?);
        let i32v = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let seqlens = upload_vec(&s, &i32v(&c.seqlens))?;
        let table = p.k.paged.as_ref().map(|pg| upload_vec(&s, &pg.table)).transpose()?;
        let bidx = cache.cache_batch_idx.as_ref().map(|v| upload_vec(&s, v)).transpose()?;
        let lpad = cache.cache_leftpad.as_ref().map(|_| upload_vec(&s, &i32v(&c.leftpad))).transpose()?;
        let rot =
            c.rot.as_ref().map(|r| Ok::<_, Error>((upload_vec(&s, &r.cos)?, upload_vec(&s, &r.sin)?))).transpose()?;
        let alibi = p.alibi.as_ref().map(|a| upload_vec(&s, &a.slopes)).transpose()?;
        let sink = p.sink.as_ref().map(|v| upload_vec(&s, v)).transpose()?;
        let descale = p.descale.as_ref().filter(|_| plan.fp8);
        let kds = descale.map(|d| upload_vec(&s, &d.k)).transpose()?;
        let vds = descale.map(|d| upload_vec(&s, &d.v)).transpose()?;
        let poisoned = poison_outputs(&p.tuning);
        let o = alloc_out(&s, &p.o_shape(), q_dtype, poisoned)?;
        let lse = alloc_out(&s, &p.lse_shape(), DType::F32, poisoned)?;
        let ws_bytes = plan.workspace().bytes;
        let ws = s.alloc_zeros::<u8>(ws_bytes).map_err(|e| dev_err("allocating the workspace", e))?;
        let ptr = |x: &Option<CudaSlice<i32>>| x.as_ref().map_or(0, |x| x.device_ptr(&s).0);
        let x = Ptrs {
            q: tq.view(&s),
            kc: tkc.view(&s),
            vc: tvc.view(&s),
            kn: tkn.as_ref().map(|t| t.view(&s)).unwrap_or_default(),
            vn: tvn.as_ref().map(|t| t.view(&s)).unwrap_or_default(),
            o: o.view(&s),
            lse: lse.base(&s),
            seqlens: seqlens.device_ptr(&s).0,
            block_table: ptr(&table),
            bt_stride: max_pages.unwrap_or(0) as i64,
            batch_idx: ptr(&bidx),
            leftpad: ptr(&lpad),
            cos: rot.as_ref().map_or(0, |r| r.0.device_ptr(&s).0),
            sin: rot.as_ref().map_or(0, |r| r.1.device_ptr(&s).0),
            rot_stride: c.rot.as_ref().map_or(0, |r| r.half as i64),
            rot_rows: c.rot.as_ref().map_or(0, |r| r.cos.len() / r.half.max(1)),
            rot_half: c.rot.as_ref().map_or(0, |r| r.half),
            interleaved: c.rot.as_ref().is_some_and(|r| r.interleaved),
            alibi: alibi.as_ref().map_or(0, |a| a.device_ptr(&s).0),
            alibi_per_batch: p.alibi.as_ref().is_some_and(|a| a.per_batch),
            sink: sink.as_ref().map_or(0, |a| a.device_ptr(&s).0),
            k_descale: kds.as_ref().map_or(0, |a| a.device_ptr(&s).0),
            v_descale: vds.as_ref().map_or(0, |a| a.device_ptr(&s).0),
            ws: ws.device_ptr(&s).0,
        };
        enqueue(&gpu, s.cu_stream(), &plan, &x)?;
        let out = ForwardOutput { o: download(&s, &o)?, lse: download(&s, &lse)? };
        let mut st = [0u8; 4];
        s.memcpy_dtoh(&ws.slice(0..4), &mut st[..]).map_err(|e| dev_err("reading the status", e))?;
        s.synchronize().map_err(|e| dev_err("running the kernels", e))?;
        let status = i32::from_le_bytes(st);
        if status != 0 {
            return Err(Error::Device(format!(
                "the KV-cache kernels refused the call (status {status}) after host validation passed"
            )));
        }
        if c.s_new > 0 {
            write_back(&s, &tkc, &mut cache.k_cache.data, &cache.k_cache.layout)?;
            // Separate values (key-prefix values were refused above).
            if let Values::Separate(v) = &mut cache.v_cache {
                write_back(&s, &tvc, &mut v.data, &v.layout)?;
            }
        }
        drop((tq, tkn, tvn, seqlens, table, bidx, lpad, rot, alibi, sink, kds, vds, ws));
        Ok(out)
    })
}

/// Copies an uploaded cache (the span `upload` took) back into the host buffer it came from.
fn write_back(
    s: &Arc<CudaStream>,
    t: &DevTensor,
    dst: &mut CpuSliceMut<'_>,
    layout: &crate::tensor::Layout,
) -> Result<()> {
    let extent = layout.extent().unwrap_or(0);
    if extent == 0 {
        return Ok(());
    }
    let lo = layout.offset - layout.offset % 8;
    let n = extent - lo;
    let elem = t.dtype.size();
    let mut bytes = vec![0u8; n * elem];
    s.memcpy_dtoh(&t.buf.slice(0..n * elem), &mut bytes[..]).map_err(|e| dev_err("copying the cache back", e))?;
    s.synchronize().map_err(|e| dev_err("copying the cache back", e))?;
    if let CpuSliceMut::E4M3(v) = dst {
        v[lo..extent].iter_mut().zip(&bytes).for_each(|(d, &b)| *d = crate::dtype::F8E4M3(b));
        return Ok(());
    }
    let bits = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    match dst {
        CpuSliceMut::F16(v) => v[lo..extent].iter_mut().zip(bits).for_each(|(d, b)| *d = half::f16::from_bits(b)),
        CpuSliceMut::BF16(v) => v[lo..extent].iter_mut().zip(bits).for_each(|(d, b)| *d = half::bf16::from_bits(b)),
        _ => return Err(Error::Device("internal: a 16-bit or e4m3 cache was expected".into())),
    }
    Ok(())
}

fn check_i32_vec(arg: &'static str, t: &DeviceTensorRef, b: usize) -> Result<()> {
    t.check(arg, &[b], DType::I32, false)
}

/// Validates the shapes of a device call and returns its plan (values on the device are checked by the
/// kernels).
fn raw_plan(
    gpu: &Gpu,
    q: &DeviceTensorRef,
    cache: &DeviceKvCache,
    o: &DeviceTensorRef,
    lse: &DeviceTensorRef,
    opts: &AttnOptions,
) -> Result<Plan> {
    if opts.varlen.is_some() {
        return Err(Error::invalid("varlen", "no varlen with a KV cache (use cache_seqlens)", "cu_seqlens"));
    }
    refuse_host_input(opts.sink.is_some(), "sink", "a device sink in DeviceKvCache::sink", "a host sink")?;
    let slopes = "device slopes in DeviceKvCache::alibi_slopes";
    refuse_host_input(opts.alibi_slopes.is_some(), "alibi_slopes", slopes, "host slopes")?;
    let descales = opts.k_descale.is_some() || opts.v_descale.is_some() || opts.q_descale.is_some();
    let device = "device descales in DeviceKvCache::k_descale / v_descale";
    refuse_host_input(descales, "k_descale", device, "host descales")?;
    let dtype = q.dtype;
    if dtype.is_fp8() {
        return Err(super::call::unsupported_dtype(dtype));
    }
    // The caches: q's dtype, or e4m3 (both) with descales optional.
    let cache_dtype = if cache.k_cache.dtype == DType::E4M3 { DType::E4M3 } else { dtype };
    if cache_dtype != DType::E4M3 && (cache.k_descale.is_some() || cache.v_descale.is_some()) {
        return Err(Error::invalid("k_descale", "no descale: the caches are not e4m3", format!("{dtype} caches")));
    }
    if let Some(dt) = opts.out_dtype.filter(|&dt| dt != dtype) {
        return Err(Error::invalid("out_dtype", format!("{dtype} (q's dtype) or none"), dt));
    }
    let [b, sq, h, d] = match q.shape[..] {
        [b, s, h, d] => [b, s, h, d],
        _ => return Err(Error::invalid("q", "rank 4 [b, sq_new, h, d]", format!("shape {:?}", q.shape))),
    };
    q.check("q", &[b, sq, h, d], dtype, false)?;
    crate::problem::check_head_dim_up_to(d, crate::problem::MAX_KV_HEAD_DIM)?;
    let cs = cache.k_cache.shape.clone();
    if cs.len() != 4 || cs[3] != d {
        return Err(Error::invalid("k_cache", format!("rank 4 with head dim {d}"), format!("shape {cs:?}")));
    }
    cache.k_cache.check("k_cache", &cs, cache_dtype, true)?;
    // A v_cache shaped as k_cache but for its head dim, or one that is k_cache's first d_v columns (same address
    // and strides: MLA's key-prefix values), is a valid call the kernels cannot run yet; so is a head dim the
    // CPU backends take on this path but the kernels are not compiled for.
    let (kc, vc) = (&cache.k_cache, &cache.v_cache);
    let vs = &vc.shape;
    let v_dims = vs.len() == 4 && vs[..3] == cs[..3];
    let key_prefix = v_dims && vc.ptr == kc.ptr && vc.strides == kc.strides && vs[3] <= d;
    super::call::require_kv_kernel_dims(d, if v_dims { vs[3] } else { d }, key_prefix)?;
    cache.v_cache.check("v_cache", &cs, cache_dtype, true)?;
    let hk = cs[2];
    crate::problem::check_heads_of(h, hk, "k_cache")?;
    let s_new = match (&cache.k_new, &cache.v_new) {
        (None, None) => 0,
        (Some(kn), Some(vn)) => {
            let s_new = kn.shape.get(1).copied().unwrap_or(0);
            kn.check("k_new", &[b, s_new, hk, d], dtype, false)?;
            vn.check("v_new", &[b, s_new, hk, d], dtype, false)?;
            s_new
        }
        (Some(_), None) => return Err(Error::invalid("v_new", "a tensor when k_new is given", "none")),
        (None, Some(_)) => return Err(Error::invalid("k_new", "a tensor when v_new is given", "none")),
    };
    check_i32_vec("cache_seqlens", &cache.cache_seqlens, b)?;
    let max_pages = match &cache.block_table {
        Some(bt) => {
            if cache.cache_batch_idx.is_some() {
                return Err(Error::invalid("cache_batch_idx", "none with a paged cache (block_table)", "a tensor"));
            }
            if cache.cache_leftpad.is_some() {
                return Err(Error::invalid("cache_leftpad", "none with a paged cache (block_table)", "a tensor"));
            }
            if bt.shape.len() != 2 || bt.shape[0] != b {
                return Err(Error::invalid(
                    "block_table",
                    format!("i32 of shape [{b}, max_pages]"),
                    format!("{:?}", bt.shape),
                ));
            }
            bt.check("block_table", &bt.shape.clone(), DType::I32, false)?;
            if cs[1] == 0 {
                return Err(Error::invalid("k_cache", "a page size >= 1", 0));
            }
            Some(bt.shape[1])
        }
        None => None,
    };
    for (arg, t) in [("cache_batch_idx", &cache.cache_batch_idx), ("cache_leftpad", &cache.cache_leftpad)] {
        if let Some(t) = t {
            check_i32_vec(arg, t, b)?;
        }
    }
    if let Some(r) = &cache.rotary {
        if s_new == 0 {
            return Err(Error::invalid("rotary_cos", "rotary only together with k_new", "no k_new"));
        }
        let sh = r.cos.shape.clone();
        if sh.len() != 2 || sh[1] == 0 || 2 * sh[1] > d {
            return Err(Error::invalid(
                "rotary_cos",
                format!("f32 [s_ro, rot / 2] with rot <= d = {d}"),
                format!("{sh:?}"),
            ));
        }
        r.cos.check("rotary_cos", &sh, DType::F32, false)?;
        r.sin.check("rotary_sin", &sh, DType::F32, false)?;
        if r.sin.strides != r.cos.strides {
            return Err(Error::invalid(
                "rotary_sin",
                format!("strides {:?} (as rotary_cos)", r.cos.strides),
                format!("{:?}", r.sin.strides),
            ));
        }
    }
    if let Some(a) = &cache.alibi_slopes {
        if !(a.shape == [h] || a.shape == [b, h]) {
            return Err(Error::invalid("alibi_slopes", format!("f32 [{h}] or [{b}, {h}]"), format!("{:?}", a.shape)));
        }
        a.check("alibi_slopes", &a.shape.clone(), DType::F32, false)?;
        if a.strides != crate::tensor::Layout::contiguous(&a.shape).strides {
            return Err(Error::invalid("alibi_slopes", "a contiguous tensor", format!("strides {:?}", a.strides)));
        }
    }
    if let Some(t) = &cache.sink {
        t.check("sink", &[h], DType::F32, false)?;
        if t.strides != [1] {
            return Err(Error::invalid("sink", "a contiguous tensor", format!("strides {:?}", t.strides)));
        }
    }
    for (arg, t) in [("k_descale", &cache.k_descale), ("v_descale", &cache.v_descale)] {
        if let Some(t) = t {
            t.check(arg, &[b, hk], DType::F32, false)?;
            if t.strides != crate::tensor::Layout::contiguous(&[b, hk]).strides {
                return Err(Error::invalid(arg, "a contiguous tensor", format!("strides {:?}", t.strides)));
            }
        }
    }
    o.check("o", &[b, sq, h, d], dtype, true)?;
    lse.check("lse", &[b, h, sq], DType::F32, true)?;
    if lse.strides != crate::tensor::Layout::contiguous(&[b, h, sq]).strides {
        return Err(Error::invalid("lse", "a contiguous tensor", format!("strides {:?}", lse.strides)));
    }
    let capacity = match max_pages {
        Some(mp) => mp * cs[1],
        None => cs[1],
    };
    let mut o2 = opts.clone();
    if cache.alibi_slopes.is_some() {
        // Only its presence matters to the plan (variant and the positive-scale rule).
        o2.alibi_slopes = Some(crate::tensor::Tensor::zeros(&[h], DType::F32));
    }
    make_plan(gpu, dtype, cache_dtype, [b, sq, h, d], hk, s_new, &cs, max_pages, cache.rotary.is_some(), capacity, &o2)
}

/// What a [`kvcache_forward_raw`] call of some shapes needs and does on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCallPlan {
    /// Bytes of workspace the call needs.
    pub workspace_bytes: usize,
    /// The number of key splits it uses.
    pub splits: usize,
}

/// The plan of a [`kvcache_forward_raw`] call of these shapes on device `n`: its workspace and key splits (they
/// depend on the shapes, the cache capacity and the device only, never on values in device memory).
pub fn kvcache_plan(
    n: usize,
    q: &DeviceTensorRef,
    cache: &DeviceKvCache,
    o: &DeviceTensorRef,
    lse: &DeviceTensorRef,
    opts: &AttnOptions,
) -> Result<KvCallPlan> {
    let call = KvCall::new(n, q, cache, o, lse, opts)?;
    Ok(KvCallPlan { workspace_bytes: call.workspace_bytes(), splits: call.plan.splits })
}

/// KV-cache attention over device memory the caller owns, on the caller's stream, with a caller-provided
/// workspace: [`KvCall::new`] then [`KvCall::enqueue`] (see them).
///
/// # Safety
/// As for [`KvCall::enqueue`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn kvcache_forward_raw(
    n: usize,
    stream: *mut c_void,
    q: &DeviceTensorRef,
    cache: &DeviceKvCache,
    o: &DeviceTensorRef,
    lse: &DeviceTensorRef,
    workspace: DeviceWorkspace,
    opts: &AttnOptions,
    zero_header: bool,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { KvCall::new(n, q, cache, o, lse, opts)?.enqueue(stream, workspace, zero_header) }
}

/// A KV-cache call over device memory the caller owns, validated and planned once: [`workspace_bytes`]
/// (Self::workspace_bytes) says what workspace it needs, then [`enqueue`](Self::enqueue) runs it with that
/// workspace on the caller's stream (the plan/run split of [`kvcache_plan`] + [`kvcache_forward_raw`], without
/// planning twice).
pub struct KvCall {
    gpu: Arc<Gpu>,
    plan: Plan,
    x: Ptrs,
    /// Bytes of `o` and `lse` to fill with NaN before the kernels ([`poison_outputs`]), when the tuning asks.
    poison: Option<(usize, usize)>,
}

impl KvCall {
    /// Validates the shapes (typed errors; the values in device memory are checked by the kernels, see
    /// [`KvWorkspace::status`]) and plans the call on device `n`. No device work.
    pub fn new(
        n: usize,
        q: &DeviceTensorRef,
        cache: &DeviceKvCache,
        o: &DeviceTensorRef,
        lse: &DeviceTensorRef,
        opts: &AttnOptions,
    ) -> Result<KvCall> {
        let gpu = runtime::gpu(n)?;
        let plan = raw_plan(&gpu, q, cache, o, lse, opts)?;
        let x = raw_ptrs(q, cache, o, lse, DeviceWorkspace { ptr: 0, bytes: 0 });
        let extent = |t: &DeviceTensorRef| t.layout().extent().unwrap_or(0);
        let poison = poison_outputs(&opts.tuning).then(|| (extent(o) * 2, extent(lse) * 4));
        Ok(KvCall { gpu, plan, x, poison })
    }

    /// Bytes of workspace the call needs.
    pub fn workspace_bytes(&self) -> usize {
        self.plan.workspace().bytes
    }

    /// The number of key splits it uses.
    pub fn splits(&self) -> usize {
        self.plan.splits
    }

    /// Appends `k_new`/`v_new` (rotated) into the cache in place, then writes `o` (q's shape, its own strides)
    /// and `lse` (`f32` `[b, h, sq]`, contiguous). Makes no allocation and no synchronisation, so the call can be
    /// captured in a CUDA graph and replayed with new data in the same buffers. The kernel module must have been
    /// loaded before capture (one earlier call of the same variant, or [`super::precompile_variants`] plus one
    /// call).
    ///
    /// `zero_header`: `false` for a workspace that is all zero before its first call (as [`KvWorkspace::new`]
    /// makes it; the kernels leave it so, apart from the status word's bits and the partial results); `true` for
    /// one whose contents are arbitrary (e.g. fresh from a caching allocator): its status word and split counters
    /// are then zeroed on `stream` first (one small memset, instead of the caller zeroing the whole workspace).
    ///
    /// # Safety
    /// Every pointer given to [`new`](Self::new) must be device memory of its CUDA device covering its shape and
    /// strides, `stream` a valid stream of that device's primary context (or null), `workspace` at least
    /// [`workspace_bytes`](Self::workspace_bytes) bytes, 256-byte aligned, all zero before its first call unless
    /// `zero_header`; all of it alive and not used by anything else (no two calls at once on different streams)
    /// until the stream has run the kernels.
    pub unsafe fn enqueue(&self, stream: *mut c_void, workspace: DeviceWorkspace, zero_header: bool) -> Result<()> {
        check_workspace(&self.plan, workspace)?;
        let x = Ptrs { ws: workspace.ptr, ..self.x };
        let plan = &self.plan;
        self.gpu.run("the CUDA KV-cache forward", || {
            let st = stream as dsys::CUstream;
            if zero_header {
                // The status word and the split counters: everything before the partial LSE.
                super::launch::zero(workspace.ptr, plan.workspace().lse_part, st)?;
            }
            if let Some((o_bytes, lse_bytes)) = self.poison {
                poison(x.o.ptr, o_bytes, st)?;
                poison(x.lse, lse_bytes, st)?;
            }
            enqueue(&self.gpu, st, plan, &x)
        })
    }
}

/// A caller's workspace must hold the plan's buffers.
fn check_workspace(plan: &Plan, workspace: DeviceWorkspace) -> Result<()> {
    workspace.check(plan.workspace().bytes)
}

impl DeviceWorkspace {
    /// Checks that the range holds `need` bytes at a 256-byte aligned, non-null address.
    pub(crate) fn check(&self, need: usize) -> Result<()> {
        if self.bytes < need || self.ptr % 256 != 0 || self.ptr == 0 {
            return Err(Error::invalid(
                "workspace",
                format!("at least {need} bytes at a 256-byte aligned address"),
                format!("{} bytes at {:#x}", self.bytes, self.ptr),
            ));
        }
        Ok(())
    }
}

fn raw_ptrs(
    q: &DeviceTensorRef,
    cache: &DeviceKvCache,
    o: &DeviceTensorRef,
    lse: &DeviceTensorRef,
    workspace: DeviceWorkspace,
) -> Ptrs {
    let ptr = |t: &Option<DeviceTensorRef>| t.as_ref().map_or(0, |t| t.ptr);
    let view = |t: &Option<DeviceTensorRef>| t.as_ref().map(|t| t.view()).unwrap_or_default();
    Ptrs {
        q: q.view(),
        kc: cache.k_cache.view(),
        vc: cache.v_cache.view(),
        kn: view(&cache.k_new),
        vn: view(&cache.v_new),
        o: o.view(),
        lse: lse.ptr,
        seqlens: cache.cache_seqlens.ptr,
        block_table: ptr(&cache.block_table),
        bt_stride: cache.block_table.as_ref().map_or(0, |t| t.strides[0] as i64),
        batch_idx: ptr(&cache.cache_batch_idx),
        leftpad: ptr(&cache.cache_leftpad),
        cos: cache.rotary.as_ref().map_or(0, |r| r.cos.ptr),
        sin: cache.rotary.as_ref().map_or(0, |r| r.sin.ptr),
        rot_stride: cache.rotary.as_ref().map_or(0, |r| r.cos.strides[0] as i64),
        rot_rows: cache.rotary.as_ref().map_or(0, |r| r.cos.shape[0]),
        rot_half: cache.rotary.as_ref().map_or(0, |r| r.cos.shape[1]),
        interleaved: cache.rotary.as_ref().is_some_and(|r| r.interleaved),
        alibi: cache.alibi_slopes.as_ref().map_or(0, |a| a.ptr),
        alibi_per_batch: cache.alibi_slopes.as_ref().is_some_and(|a| a.shape.len() == 2),
        sink: cache.sink.as_ref().map_or(0, |t| t.ptr),
        k_descale: ptr(&cache.k_descale),
        v_descale: ptr(&cache.v_descale),
        ws: workspace.ptr,
    }
}

/// A [`kvcache_forward_raw`] call validated once, whose kernels can be enqueued again and again on any
/// stream of its device (a decode loop that reuses its buffers): each [`enqueue`](Self::enqueue) only
/// launches the kernels (2 or 3 launches, no validation, no allocation, no synchronisation).
pub struct KvPrepared {
    gpu: Arc<Gpu>,
    module: Arc<Loaded>,
    plan: Plan,
    x: Ptrs,
}

impl KvPrepared {
    /// Validates a call as [`kvcache_forward_raw`] does and loads its kernels.
    ///
    /// # Safety
    /// As for [`kvcache_forward_raw`], for every later [`enqueue`](Self::enqueue).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        n: usize,
        q: &DeviceTensorRef,
        cache: &DeviceKvCache,
        o: &DeviceTensorRef,
        lse: &DeviceTensorRef,
        workspace: DeviceWorkspace,
        opts: &AttnOptions,
    ) -> Result<KvPrepared> {
        let KvCall { gpu, plan, x, .. } = KvCall::new(n, q, cache, o, lse, opts)?;
        check_workspace(&plan, workspace)?;
        let x = Ptrs { ws: workspace.ptr, ..x };
        let module = gpu.module(&variant(&plan, &x))?;
        Ok(KvPrepared { gpu, module, plan, x })
    }

    /// The number of key splits.
    pub fn splits(&self) -> usize {
        self.plan.splits
    }

    /// Enqueues the kernels on `stream` (a stream of the device, or null).
    ///
    /// # Safety
    /// The buffers given to [`new`](Self::new) must still be valid, and `stream` a stream of the device.
    pub unsafe fn enqueue(&self, stream: *mut c_void) -> Result<()> {
        self.gpu.run("the CUDA KV-cache forward", || {
            enqueue_with(&self.gpu, &self.module, stream as dsys::CUstream, &self.plan, &self.x)
        })
    }
}

/// A decode problem resident on the device for benchmarks: a cache of `sk` tokens per sequence (unpaged,
/// or paged with a shuffled block table), filled with pseudo-random values on the device, one new query
/// token per sequence, attention timed with CUDA events through a [`KvPrepared`] call.
pub struct KvDecodeBench {
    gpu: Arc<Gpu>,
    call: KvPrepared,
    ws: KvWorkspace,
    _bufs: Vec<CudaSlice<u8>>,
    flush: Option<CudaSlice<u8>>,
}

impl KvDecodeBench {
    /// Allocates and fills the problem `[b, sq, h, d]` against `sk` cached tokens with `hk` key/value heads
    /// (`page_size`: `None` = unpaged). The cache has the logical shape `[b, sk, hk, d]` (paged: `[pages,
    /// page_size, hk, d]`) and `cache_dtype` (`dtype`, or `e4m3` with unit descales); `head_major` stores each
    /// head's rows contiguously (strides of a `[b, hk, sk, d]` or `[pages, hk, page_size, d]` buffer), else
    /// token-major (contiguous).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        b: usize,
        h: usize,
        hk: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dtype: DType,
        cache_dtype: DType,
        page_size: Option<usize>,
        head_major: bool,
        seed: u64,
        tuning: &crate::tuning::Tuning,
    ) -> Result<KvDecodeBench> {
        let gpu = runtime::gpu(n)?;
        let s = gpu.stream.clone();
        gpu.run("setting up the decode benchmark", || {
            let head_dim = padded_head_dim(d).ok_or_else(|| Error::invalid("d", "<= 256", d))?;
            let fp8 = cache_dtype == DType::E4M3;
            // The e4m3 variant's kv_fill also fills 16-bit buffers.
            let fill_v = Variant {
                kv_fp8: fp8,
                ..kv_variant(head_dim, dtype == DType::BF16, false, false, false, true).tuned(tuning)
            };
            let m = gpu.module(&fill_v)?;
            let mut bufs = Vec::new();
            let mut seed_n = seed as u32;
            let mut alloc = |shape: &[usize], dt: DType| -> Result<DeviceTensorRef> {
                let elems: usize = shape.iter().product();
                let buf = s.alloc_zeros::<u8>((elems * dt.size()).max(256)).map_err(|e| dev_err("allocating", e))?;
                let ptr = buf.device_ptr(&s).0;
                seed_n = seed_n.wrapping_mul(2654435761).wrapping_add(12345);
                let e4m3 = (dt == DType::E4M3) as i32;
                let fp = KvFillParams { dst: ptr as *mut c_void, n: elems as i64, seed: seed_n, e4m3 };
                // SAFETY: `fp` mirrors KvFillParams and points at `elems` elements of `dt` (16-bit, or e4m3 bytes
                // with the e4m3 module).
                unsafe { launch(&m.kernels["kv_fill"], "kv_fill", s.cu_stream(), (1024, 1, 1), 256, 0, &fp)? };
                bufs.push(buf);
                Ok(DeviceTensorRef::contiguous(ptr, dt, shape))
            };
            let q = alloc(&[b, sq, h, d], dtype)?;
            let o = alloc(&[b, sq, h, d], dtype)?;
            let (cache_shape, table) = match page_size {
                None => (vec![b, sk, hk, d], None),
                Some(ps) => {
                    let mp = sk.div_ceil(ps);
                    let mut t: Vec<i32> = (0..(b * mp) as i32).collect();
                    let mut x = seed.wrapping_add(7);
                    for i in (1..t.len()).rev() {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        t.swap(i, (x >> 33) as usize % (i + 1));
                    }
                    (vec![b * mp, ps, hk, d], Some((t, mp)))
                }
            };
            let cache_dtype = if fp8 { DType::E4M3 } else { dtype };
            let mut kc = alloc(&cache_shape, cache_dtype)?;
            let mut vc = alloc(&cache_shape, cache_dtype)?;
            if head_major {
                let [_, rows, heads, dd] = [cache_shape[0], cache_shape[1], cache_shape[2], cache_shape[3]];
                for t in [&mut kc, &mut vc] {
                    t.strides = vec![heads * rows * dd, dd, rows * dd, 1];
                }
            }
            let mut small = Vec::new();
            let mut i32buf = |v: &[i32], shape: &[usize]| -> Result<DeviceTensorRef> {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let buf = s.clone_htod(&bytes).map_err(|e| dev_err("copying", e))?;
                let r = DeviceTensorRef::contiguous(buf.device_ptr(&s).0, DType::I32, shape);
                small.push(buf);
                Ok(r)
            };
            let seqlens = i32buf(&vec![sk as i32; b], &[b])?;
            let block_table = match &table {
                Some((t, mp)) => Some(i32buf(t, &[b, *mp])?),
                None => None,
            };
            let lse_buf = s.alloc_zeros::<u8>((b * h * sq * 4).max(256)).map_err(|e| dev_err("allocating", e))?;
            let lse = DeviceTensorRef::contiguous(lse_buf.device_ptr(&s).0, DType::F32, &[b, h, sq]);
            small.push(lse_buf);
            bufs.extend(small);
            let cache = DeviceKvCache {
                k_cache: kc,
                v_cache: vc,
                k_new: None,
                v_new: None,
                cache_seqlens: seqlens,
                block_table,
                cache_batch_idx: None,
                cache_leftpad: None,
                rotary: None,
                alibi_slopes: None,
                sink: None,
                k_descale: None,
                v_descale: None,
            };
            let opts = AttnOptions { tuning: tuning.clone(), ..AttnOptions::default() };
            let plan = raw_plan(&gpu, &q, &cache, &o, &lse, &opts)?;
            let ws = KvWorkspace::new(n, plan.workspace().bytes)?;
            // SAFETY: the buffers live in `bufs`, owned by the result, as long as the prepared call.
            let call = unsafe { KvPrepared::new(n, &q, &cache, &o, &lse, ws.as_device(), &opts)? };
            s.synchronize().map_err(|e| dev_err("filling the benchmark inputs", e))?;
            Ok(KvDecodeBench { gpu: gpu.clone(), call, ws, _bufs: bufs, flush: None })
        })
    }

    /// The key splits this problem runs with.
    pub fn splits(&self) -> usize {
        self.call.splits()
    }

    /// Enqueues one call on the backend's stream.
    pub fn run(&self) -> Result<()> {
        // SAFETY: every buffer was allocated for these shapes on this device and lives as long as `self`.
        unsafe { self.call.enqueue(self.gpu.stream.cu_stream() as *mut c_void) }
    }

    /// The status word of the workspace (0 = fine).
    pub fn status(&self) -> Result<i32> {
        self.ws.status()
    }

    /// `warmup` untimed and `reps` timed calls, each between CUDA events, the L2 flushed (256 MiB memset)
    /// before each; milliseconds per call.
    pub fn time(&mut self, warmup: usize, reps: usize) -> Result<Vec<f64>> {
        let gpu = self.gpu.clone();
        let s = gpu.stream.clone();
        gpu.run("timing the decode kernels", || {
            const FLUSH: usize = 256 << 20;
            if self.flush.is_none() {
                // SAFETY: only ever zeroed, never read.
                self.flush = Some(unsafe { s.alloc::<u8>(FLUSH) }.map_err(|e| dev_err("allocating", e))?);
            }
            let fp = self.flush.as_ref().map(|b| b.device_ptr(&s).0).unwrap_or(0);
            for _ in 0..warmup {
                super::launch::zero(fp, FLUSH, s.cu_stream())?;
                self.run()?;
            }
            let mut ev = Vec::with_capacity(reps);
            for _ in 0..reps {
                let mk = || gpu.ctx.new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT));
                let (e0, e1) = (
                    mk().map_err(|e| dev_err("creating an event", e))?,
                    mk().map_err(|e| dev_err("creating an event", e))?,
                );
                super::launch::zero(fp, FLUSH, s.cu_stream())?;
                e0.record(&s).map_err(|e| dev_err("recording an event", e))?;
                self.run()?;
                e1.record(&s).map_err(|e| dev_err("recording an event", e))?;
                ev.push((e0, e1));
            }
            s.synchronize().map_err(|e| dev_err("running the kernels", e))?;
            ev.iter().map(|(a, b)| a.elapsed_ms(b).map(f64::from).map_err(|e| dev_err("reading an event", e))).collect()
        })
    }
}

/// Device-to-device copy bandwidth of device `n` (GB/s counting bytes read plus bytes written): median of
/// `reps` copies of `bytes` bytes timed with CUDA events.
pub fn copy_gbps(n: usize, bytes: usize, reps: usize) -> Result<f64> {
    let gpu = runtime::gpu(n)?;
    let s = gpu.stream.clone();
    gpu.run("measuring the copy bandwidth", || {
        let a = s.alloc_zeros::<u8>(bytes).map_err(|e| dev_err("allocating", e))?;
        let mut b = s.alloc_zeros::<u8>(bytes).map_err(|e| dev_err("allocating", e))?;
        let mut ts = Vec::new();
        for i in 0..reps + 3 {
            let mk = || gpu.ctx.new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT));
            let (e0, e1) = (mk().map_err(|e| dev_err("event", e))?, mk().map_err(|e| dev_err("event", e))?);
            e0.record(&s).map_err(|e| dev_err("event", e))?;
            s.memcpy_dtod(&a, &mut b).map_err(|e| dev_err("copying", e))?;
            e1.record(&s).map_err(|e| dev_err("event", e))?;
            s.synchronize().map_err(|e| dev_err("copying", e))?;
            if i >= 3 {
                ts.push(e0.elapsed_ms(&e1).map_err(|e| dev_err("event", e))? as f64);
            }
        }
        ts.sort_by(f64::total_cmp);
        let ms = ts[ts.len() / 2];
        Ok(2.0 * bytes as f64 / ms / 1e6)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_heuristic_fills_the_gpu() {
        // H100: 132 SMs, 2 CTAs per SM at d128.
        assert_eq!(choose_splits(8, 4096, 132, 2), choose_splits(8, 4096, 132, 2));
        let s = choose_splits(8, 4096, 132, 2);
        assert!(s > 16 && s <= 64, "{s}");
        // b = 1, 8 KV heads: at least 95% of the 264 slots busy (32 or 33 splits).
        let s = choose_splits(8, 131072, 132, 2);
        assert!(8 * s >= 251 && 8 * s <= 264, "{s}");
        assert_eq!(choose_splits(256, 32768, 132, 2), 1);
        assert_eq!(choose_splits(8, 16, 132, 2), 1);
        let s = choose_splits(64, 131072, 132, 2);
        assert!((2..=8).contains(&s), "{s}");
        assert!(choose_splits(1, 1 << 20, 132, 2) <= MAX_SPLITS);
    }

    #[test]
    fn params_layout() {
        // 22 pointers, 21 i64, 20 32-bit fields (the C struct has the same, no padding).
        assert_layout!(KvParams, size 22 * 8 + 21 * 8 + 20 * 4, {
            sink: 19 * 8,
            v_descale: 21 * 8,
            b: 22 * 8 + 21 * 8,
        });
        assert_eq!(std::mem::size_of::<KvFillParams>(), 24);
    }

    #[test]
    fn smem_fits_two_ctas_at_d128() {
        // d 128: swizzled 256-byte rows; d 96: padded 208-byte rows.
        let smem = |hd| attn_smem(hd, super::super::tiles::default_stages(hd), false);
        assert_eq!(smem(128), 16 * 256 + 4 * 3 * 32 * 256 + 512);
        assert_eq!(smem(96), 16 * 208 + 4 * 3 * 32 * 208 + 512);
        assert!(2 * (smem(128) as usize + 1024) <= 228 * 1024);
        assert!(smem(256) as usize <= 227 * 1024);
        // e4m3 caches: 1-byte stages plus one widened 16-bit K/V tile per warp.
        assert_eq!(attn_smem(128, 3, true), 16 * 256 + 4 * (3 * 32 * 128 + 32 * 256) + 512);
        assert!(attn_smem(256, 2, true) <= attn_smem(256, 2, false));
    }
}
