//! Validation and normalisation: a call's tensors and options are checked once and turned into a
//! [`Problem`] that every backend consumes. Nothing past this point needs to re-check user input.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::AttnOptions;
use crate::semantics::Mask;
use crate::tensor::{Layout, TensorView};

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 256;

/// Largest head dimension (of q and k, and of v) on the KV-cache path of the CPU backends, above
/// [`MAX_HEAD_DIM`] for multi-head latent attention: DeepSeek's MLA decodes in its absorbed form with d = 576 and
/// d_v = 512 (the values the first 512 columns of the key cache, [`crate::kvcache::Values::KeyPrefix`]). The CUDA
/// KV-cache kernels take head dims up to [`MAX_HEAD_DIM`] and refuse larger ones (`Unsupported`).
pub const MAX_KV_HEAD_DIM: usize = 576;

/// Maps `(sequence, row, head)` to the element offset of that row's first element (the head dim is
/// contiguous). Dense and varlen tensors use a per-sequence base; paged KV caches go through a block table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMap {
    /// Element offset of row 0, head 0 of each sequence (unpaged).
    pub base: Vec<usize>,
    /// Step between rows, in elements.
    pub row_stride: usize,
    /// Step between heads, in elements.
    pub head_stride: usize,
    /// The block table, for paged KV caches.
    pub paged: Option<Paged>,
}

/// A paged KV cache's addressing: row `t` of sequence `i` is row `t % page_size` of page
/// `table[i * max_pages + t / page_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Paged {
    /// `[b, max_pages]` page indices (validated in range for every row used).
    pub table: Vec<i32>,
    /// Columns of the block table.
    pub max_pages: usize,
    /// Rows per page.
    pub page_size: usize,
    /// Step between pages, in elements.
    pub page_stride: usize,
    /// Element offset of page 0.
    pub offset: usize,
}

impl RowMap {
    /// Element offset of `(seq, row, head)`.
    #[inline]
    pub fn at(&self, seq: usize, row: usize, head: usize) -> usize {
        match &self.paged {
            None => self.base[seq] + row * self.row_stride + head * self.head_stride,
            Some(p) => {
                let page = p.table[seq * p.max_pages + row / p.page_size] as usize;
                p.offset + page * p.page_stride + (row % p.page_size) * self.row_stride + head * self.head_stride
            }
        }
    }
}

/// ALiBi slopes, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Alibi {
    /// `[h]` or `[b, h]`, row-major.
    pub slopes: Vec<f32>,
    /// Whether the slopes are per batch entry (`[b, h]`).
    pub per_batch: bool,
}

impl Alibi {
    /// The slope of `(seq, head)`.
    #[inline]
    pub fn slope(&self, seq: usize, head: usize, h: usize) -> f32 {
        if self.per_batch {
            self.slopes[seq * h + head]
        } else {
            self.slopes[head]
        }
    }
}

/// FP8 descale factors, resolved: `[b, hk]` row-major each, 1 where not given.
#[derive(Debug, Clone, PartialEq)]
pub struct Descale {
    /// Of q (query head `i` uses column `i / (h / hk)`).
    pub q: Vec<f32>,
    /// Of k (or k_cache).
    pub k: Vec<f32>,
    /// Of v (or v_cache).
    pub v: Vec<f32>,
}

/// A validated attention problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Element type of q, k, v and (but with FP8) the outputs. [`DType::E4M3`] when the inputs are FP8; with an
    /// FP8 KV cache, q may be f16 or bf16 (the backends read q's own dtype from its data).
    pub dtype: DType,
    /// Element type of `o`: `dtype`, bf16/f16 with FP8 inputs, or f32 with 16-bit ones ([`AttnOptions::out_dtype`]).
    pub out_dtype: DType,
    /// FP8 descale factors, when the inputs are FP8 (`None` otherwise: the values are used as they are).
    pub descale: Option<Descale>,
    /// Number of sequences.
    pub batch: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads.
    pub hk: usize,
    /// Head dimension of q and k (the score products' inner dimension).
    pub d: usize,
    /// Head dimension of v, which is also that of `o`, `dout` and `dv` (may differ from `d`).
    pub d_v: usize,
    /// Queries of each sequence.
    pub seqlen_q: Vec<usize>,
    /// Keys of each sequence (after `seqused_k`, KV-cache lengths and leftpad).
    pub seqlen_k: Vec<usize>,
    /// Logical index of each sequence's first query row (`cu_seqlens_q`, or `i * sq` when dense).
    pub q_start: Vec<usize>,
    /// Logical index of each sequence's first key row (`cu_seqlens_k`, or `i * sk` when dense).
    pub k_start: Vec<usize>,
    /// Rows of q in all (`b * sq`, or `total_q`).
    pub total_q: usize,
    /// Queries per sequence of a dense (not varlen) batch: q's second dimension, also when the batch is empty.
    pub dense_sq: usize,
    /// Rows of k in all (`b * sk`, or `total_k`; for a KV cache, `sum(seqlen_k)`).
    pub total_k: usize,
    /// Whether the batch is variable-length (q is `[total_q, h, d]`, lse is `[h, total_q]`).
    pub varlen: bool,
    /// Softmax scale.
    pub scale: f32,
    /// Soft-capping (0 = off).
    pub softcap: f32,
    /// ALiBi slopes.
    pub alibi: Option<Alibi>,
    /// Visibility.
    pub mask: Mask,
    /// Where q's rows are.
    pub q: RowMap,
    /// Where k's rows are.
    pub k: RowMap,
    /// Where v's rows are.
    pub v: RowMap,
    /// Original varlen arrays, for device backends.
    pub cu_seqlens: Option<(Vec<i32>, Vec<i32>)>,
    /// `seqused_k`, for device backends.
    pub seqused_k: Option<Vec<i32>>,
    /// Learnable sink logit per query head (`f32`), when given.
    pub sink: Option<Vec<f32>>,
    /// The call's dispatch and tuning choices ([`AttnOptions::tuning`]), for the CUDA backend.
    pub tuning: crate::tuning::Tuning,
}

impl Problem {
    /// The factor q's rows of `(seq, head)` (a query head) are multiplied by: its FP8 descale, else 1.
    #[inline]
    pub fn q_scale(&self, seq: usize, head: usize) -> f32 {
        self.descale.as_ref().map_or(1.0, |d| d.q[seq * self.hk + head / (self.h / self.hk)])
    }
    /// The factor k's rows of `(seq, kv_head)` are multiplied by: the FP8 descale, else 1.
    #[inline]
    pub fn k_scale(&self, seq: usize, kv_head: usize) -> f32 {
        self.descale.as_ref().map_or(1.0, |d| d.k[seq * self.hk + kv_head])
    }
    /// The factor v's rows of `(seq, kv_head)` are multiplied by: the FP8 descale, else 1.
    #[inline]
    pub fn v_scale(&self, seq: usize, kv_head: usize) -> f32 {
        self.descale.as_ref().map_or(1.0, |d| d.v[seq * self.hk + kv_head])
    }
    /// Whether the inputs are FP8 (forward only).
    pub fn is_fp8(&self) -> bool {
        self.dtype.is_fp8()
    }
    /// The error of a backward pass (or other operation, `what`) that FP8 inputs do not take.
    pub fn refuse_fp8(&self, what: &str) -> Result<()> {
        if self.is_fp8() {
            return Err(Error::invalid(
                "q",
                format!("dtype f16, bf16 or f32 for {what} (FP8 inputs are forward-only)"),
                self.dtype,
            ));
        }
        Ok(())
    }
    /// The largest query length.
    pub fn max_seqlen_q(&self) -> usize {
        self.seqlen_q.iter().copied().max().unwrap_or(0)
    }
    /// The largest key length.
    pub fn max_seqlen_k(&self) -> usize {
        self.seqlen_k.iter().copied().max().unwrap_or(0)
    }
    /// Shape of `o` (q's, with the value head dim `d_v` last).
    pub fn o_shape(&self) -> Vec<usize> {
        if self.varlen {
            vec![self.total_q, self.h, self.d_v]
        } else {
            vec![self.batch, self.dense_sq, self.h, self.d_v]
        }
    }
    /// Shape of `dq` (q's).
    pub fn q_shape(&self) -> Vec<usize> {
        if self.varlen {
            vec![self.total_q, self.h, self.d]
        } else {
            vec![self.batch, self.dense_sq, self.h, self.d]
        }
    }
    /// Shape of `lse`: `[b, h, sq]`, or `[h, total_q]` when varlen.
    pub fn lse_shape(&self) -> Vec<usize> {
        if self.varlen {
            vec![self.h, self.total_q]
        } else {
            vec![self.batch, self.h, self.dense_sq]
        }
    }
    /// Index of `(seq, head, row)` in a contiguous lse tensor of [`Problem::lse_shape`].
    #[inline]
    pub fn lse_index(&self, seq: usize, head: usize, row: usize) -> usize {
        if self.varlen {
            head * self.total_q + self.q_start[seq] + row
        } else {
            let sq = self.dense_sq;
            (seq * self.h + head) * sq + row
        }
    }
    /// The row map of an output laid out like q (`o`, `do`, `dq`), from its validated layout.
    pub fn q_like_map(&self, layout: &Layout) -> RowMap {
        row_map(layout, self.varlen, &self.q_start)
    }
    /// The row map of a tensor laid out like k (`dk`, `dv`), from its validated layout.
    pub fn k_like_map(&self, layout: &Layout) -> RowMap {
        row_map(layout, self.varlen, &self.k_start)
    }
    /// Floating-point operations of the forward pass: `2 * sum(visible pairs) * (d + d_v)` (the `Q Kᵀ` and
    /// `P V` products), counted exactly.
    pub fn forward_flops(&self) -> f64 {
        let mut pairs = 0f64;
        for (&sq, &sk) in self.seqlen_q.iter().zip(&self.seqlen_k) {
            if !self.mask.is_active() {
                pairs += (sq * sk) as f64;
            } else {
                pairs += (0..sq).map(|i| self.mask.key_range(i, sq, sk).len() as f64).sum::<f64>();
            }
        }
        2.0 * pairs * self.h as f64 * (self.d + self.d_v) as f64
    }
}

/// Bases wrap: they are exact for every row that exists (validated in bounds), while an empty tensor's
/// strides and offset are unconstrained and its bases are never read.
fn row_map(layout: &Layout, varlen: bool, starts: &[usize]) -> RowMap {
    let s = &layout.strides;
    if varlen {
        RowMap {
            base: starts.iter().map(|&r| layout.offset.wrapping_add(r.wrapping_mul(s[0]))).collect(),
            row_stride: s[0],
            head_stride: s[1],
            paged: None,
        }
    } else {
        RowMap {
            base: (0..starts.len()).map(|i| layout.offset.wrapping_add(i.wrapping_mul(s[0]))).collect(),
            row_stride: s[1],
            head_stride: s[2],
            paged: None,
        }
    }
}

/// Checks that a view's layout is in bounds of its buffer and has a contiguous last dimension.
pub(crate) fn check_view(arg: &'static str, t: &TensorView<'_>) -> Result<()> {
    check_layout_in(arg, &t.layout, t.data.len())
}

pub(crate) fn check_layout_in(arg: &'static str, layout: &Layout, len: usize) -> Result<()> {
    if layout.shape.len() != layout.strides.len() {
        return Err(Error::invalid(arg, format!("{} strides (one per dim)", layout.shape.len()), layout.strides.len()));
    }
    match layout.extent() {
        Some(e) if e <= len => {}
        _ => {
            return Err(Error::invalid(
                arg,
                format!("a layout inside its buffer of {len} elements"),
                format!("shape {:?} strides {:?} offset {}", layout.shape, layout.strides, layout.offset),
            ))
        }
    }
    if let (Some(&n), Some(&st)) = (layout.shape.last(), layout.strides.last()) {
        if n > 1 && st != 1 {
            return Err(Error::invalid(arg, "a contiguous last dimension (stride 1)", format!("stride {st}")));
        }
    }
    Ok(())
}

/// The dtype a backward call's gradients must have, given `dq`'s: the inputs' dtype, or f32 for all three
/// (partial gradients that a caller sums before one rounding, as ring attention does). The same rule on every
/// backend.
pub(crate) fn gradient_dtype(inputs: DType, dq: DType) -> DType {
    if dq == DType::F32 {
        DType::F32
    } else {
        inputs
    }
}

/// Checks an output's shape, dtype and layout (in bounds, contiguous last dim, no self-overlap).
pub(crate) fn check_output(
    arg: &'static str,
    layout: &Layout,
    len: usize,
    dtype: DType,
    want_shape: &[usize],
    want_dtype: DType,
) -> Result<()> {
    if layout.shape != want_shape {
        return Err(Error::invalid(arg, format!("shape {want_shape:?}"), format!("{:?}", layout.shape)));
    }
    if dtype != want_dtype {
        return Err(Error::invalid(arg, format!("dtype {want_dtype}"), dtype));
    }
    check_layout_in(arg, layout, len)?;
    if !layout.is_non_overlapping() {
        return Err(Error::invalid(
            arg,
            "a layout whose elements do not overlap",
            format!("strides {:?}", layout.strides),
        ));
    }
    Ok(())
}

/// Checks the backward's extra inputs against the problem: `o` and `dout` shaped and typed like the output
/// ([`Problem::o_shape`]: q's shape with the value head dim last),
/// `lse` `f32` of [`Problem::lse_shape`], all in bounds with a contiguous last dim. Shared by every backend.
pub fn check_backward_inputs(
    p: &Problem,
    o: &TensorView<'_>,
    lse: &TensorView<'_>,
    dout: &TensorView<'_>,
) -> Result<()> {
    for (arg, t) in [("o", o), ("dout", dout)] {
        check_view(arg, t)?;
        if t.shape() != p.o_shape().as_slice() {
            return Err(Error::invalid(
                arg,
                format!("shape {:?} (as q, with v's head dim {} last)", p.o_shape(), p.d_v),
                format!("{:?}", t.shape()),
            ));
        }
        if t.dtype() != p.dtype {
            return Err(Error::invalid(arg, format!("dtype {} (as q)", p.dtype), t.dtype()));
        }
    }
    check_view("lse", lse)?;
    if lse.shape() != p.lse_shape().as_slice() || lse.dtype() != DType::F32 {
        return Err(Error::invalid(
            "lse",
            format!("f32 of shape {:?}", p.lse_shape()),
            format!("{} of shape {:?}", lse.dtype(), lse.shape()),
        ));
    }
    Ok(())
}

pub(crate) fn check_finite_scale(scale: Option<f32>, d: usize) -> Result<f32> {
    match scale {
        None => Ok(1.0 / (d as f32).sqrt()),
        Some(s) if s.is_finite() => Ok(s),
        Some(s) => Err(Error::invalid("softmax_scale", "a finite number", s)),
    }
}

pub(crate) fn check_softcap(cap: f32) -> Result<f32> {
    if cap.is_finite() && cap >= 0.0 {
        Ok(cap)
    } else {
        Err(Error::invalid("softcap", "a finite number >= 0 (0 = off)", cap))
    }
}

/// Checks q's head dim `d` against [`MAX_HEAD_DIM`].
pub(crate) fn check_head_dim(d: usize) -> Result<()> {
    check_head_dim_up_to(d, MAX_HEAD_DIM)
}

/// Checks q's head dim `d`: in `1..=max` ([`MAX_HEAD_DIM`], or [`MAX_KV_HEAD_DIM`] on the KV-cache path).
pub(crate) fn check_head_dim_up_to(d: usize, max: usize) -> Result<()> {
    if d == 0 || d > max {
        return Err(Error::invalid("q", format!("head dim in 1..={max}"), d));
    }
    Ok(())
}

/// Checks the value head dim `d_v` (v's last dim, blamed on `arg`, `v` or `v_cache`): the same range as `d`.
pub(crate) fn check_value_head_dim(arg: &'static str, d_v: usize) -> Result<()> {
    check_value_head_dim_up_to(arg, d_v, MAX_HEAD_DIM)
}

/// [`check_value_head_dim`] with the bound `max` ([`MAX_KV_HEAD_DIM`] on the KV-cache path).
pub(crate) fn check_value_head_dim_up_to(arg: &'static str, d_v: usize, max: usize) -> Result<()> {
    if d_v == 0 || d_v > max {
        return Err(Error::invalid(arg, format!("value head dim (last dim) in 1..={max}"), d_v));
    }
    Ok(())
}

/// Largest batch (number of sequences) a call accepts. Per-sequence metadata (lengths, starts, row bases:
/// a few words per sequence) is allocated before any work, also for an empty tensor, so the batch is bounded
/// here rather than by the tensors' sizes; it is also below `i32::MAX`, the type of sequence counts in
/// `cu_seqlens` and the device parameters.
pub const MAX_BATCH: usize = 1 << 24;

/// Checks the batch (named by `arg`, the tensor or array it comes from) against [`MAX_BATCH`].
pub(crate) fn check_batch(arg: &'static str, b: usize) -> Result<()> {
    if b > MAX_BATCH {
        return Err(Error::invalid(
            arg,
            format!("a batch of at most {MAX_BATCH} sequences (per-sequence metadata is allocated up front)"),
            format!("{b} sequences"),
        ));
    }
    Ok(())
}

/// [`check_heads_of`] for `k`.
pub(crate) fn check_heads(h: usize, hk: usize) -> Result<()> {
    check_heads_of(h, hk, "k")
}

/// Checks the head counts: `h >= 1` (blamed on `q`), `hk >= 1` dividing `h` (blamed on `k_arg`, `k` or
/// `k_cache`).
pub(crate) fn check_heads_of(h: usize, hk: usize, k_arg: &'static str) -> Result<()> {
    if h == 0 {
        return Err(Error::invalid("q", "at least 1 head", "0 heads"));
    }
    if hk == 0 || h % hk != 0 {
        return Err(Error::invalid(
            k_arg,
            format!("a number of heads dividing the query heads ({h})"),
            format!("{hk} heads"),
        ));
    }
    Ok(())
}

/// The FP8 part of a call: the problem's dtype, the output dtype and the descales. `q_dtype` is q's dtype and
/// `kv_dtype` k's (or k_cache's; v's was checked equal); `kv_arg` names k (`k` or `k_cache`). FP8 means k/v
/// are `e4m3`, with q `e4m3` too or (`kv_cache_path`) f16/bf16. Descales are refused without FP8 inputs,
/// `q_descale` with a 16-bit q; without FP8 inputs `out_dtype` may only be q's dtype or f32.
pub(crate) fn check_fp8(
    opts: &AttnOptions,
    q_dtype: DType,
    kv_dtype: DType,
    kv_arg: &'static str,
    kv_cache_path: bool,
    batch: usize,
    hk: usize,
) -> Result<(DType, DType, Option<Descale>)> {
    let descales = [("q_descale", &opts.q_descale), ("k_descale", &opts.k_descale), ("v_descale", &opts.v_descale)];
    if !kv_dtype.is_fp8() {
        if q_dtype.is_fp8() {
            return Err(Error::invalid(kv_arg, "dtype e4m3 (as q: an FP8 q needs FP8 keys and values)", kv_dtype));
        }
        for (arg, t) in descales {
            if let Some(t) = t {
                return Err(Error::invalid(
                    arg,
                    format!("no descale: the inputs are {q_dtype}, not FP8 (e4m3)"),
                    format!("a {} tensor of shape {:?}", t.dtype(), t.shape()),
                ));
            }
        }
        // 16-bit inputs may write an f32 output (partial outputs that a caller merges before one rounding, as ring
        // attention does), except on the KV-cache path; otherwise the output has q's dtype.
        let out = match opts.out_dtype {
            None => q_dtype,
            Some(DType::F32) if !kv_cache_path => DType::F32,
            Some(dt) => {
                return Err(Error::invalid(
                    "out_dtype",
                    if kv_cache_path {
                        format!("none: a KV-cache call's output has q's dtype ({q_dtype}) unless the cache is FP8")
                    } else {
                        format!("none (q's dtype, {q_dtype}) or f32: bf16 and f16 are the output dtypes of FP8 inputs")
                    },
                    dt,
                ))
            }
        };
        return Ok((q_dtype, out, None));
    }
    if !q_dtype.is_fp8() {
        if !kv_cache_path {
            return Err(Error::invalid(
                "q",
                format!(
                    "dtype {kv_dtype} (as {kv_arg}: a 16-bit q with FP8 keys and values only on the KV-cache path)"
                ),
                q_dtype,
            ));
        }
        if !matches!(q_dtype, DType::F16 | DType::BF16) {
            return Err(Error::invalid("q", "dtype e4m3, f16 or bf16 with an FP8 (e4m3) KV cache", q_dtype));
        }
        if let Some(t) = &opts.q_descale {
            return Err(Error::invalid(
                "q_descale",
                format!("no descale: q is {q_dtype}, not FP8 (only the KV cache is)"),
                format!("a {} tensor of shape {:?}", t.dtype(), t.shape()),
            ));
        }
    }
    let out = match opts.out_dtype {
        None if q_dtype.is_fp8() => DType::BF16,
        None => q_dtype,
        Some(dt @ (DType::BF16 | DType::F16)) => dt,
        Some(dt) => return Err(Error::invalid("out_dtype", "bf16 or f16 (the output of FP8 inputs)", dt)),
    };
    let mut resolved = Vec::with_capacity(3);
    for (arg, t) in descales {
        let Some(t) = t else {
            resolved.push(vec![1f32; batch * hk]);
            continue;
        };
        if t.dtype() != DType::F32 {
            return Err(Error::invalid(arg, "dtype f32", t.dtype()));
        }
        if t.shape() != [batch, hk] {
            return Err(Error::invalid(
                arg,
                format!("shape [{batch}, {hk}] ([batch, kv heads])"),
                format!("{:?}", t.shape()),
            ));
        }
        let x = t.to_f32_vec();
        if let Some(bad) = x.iter().find(|x| !x.is_finite()) {
            return Err(Error::invalid(arg, "finite values", bad));
        }
        resolved.push(x);
    }
    let v = resolved.pop().unwrap_or_default();
    let k = resolved.pop().unwrap_or_default();
    let q = resolved.pop().unwrap_or_default();
    Ok((kv_dtype, out, Some(Descale { q, k, v })))
}

/// The sink of `opts` (`[h]`, a float dtype, finite) as `f32` logits.
pub(crate) fn check_sink(opts: &AttnOptions, h: usize) -> Result<Option<Vec<f32>>> {
    let Some(t) = &opts.sink else { return Ok(None) };
    if !t.dtype().is_float() {
        return Err(Error::invalid("sink", "dtype f32, f16 or bf16", t.dtype()));
    }
    if t.shape() != [h] {
        return Err(Error::invalid(
            "sink",
            format!("shape [{h}] (one logit per query head)"),
            format!("{:?}", t.shape()),
        ));
    }
    let sink = t.to_f32_vec();
    if let Some(x) = sink.iter().find(|x| !x.is_finite()) {
        return Err(Error::invalid("sink", "finite values", x));
    }
    Ok(Some(sink))
}

pub(crate) fn check_alibi(opts: &AttnOptions, batch: usize, h: usize) -> Result<Option<Alibi>> {
    let Some(t) = &opts.alibi_slopes else { return Ok(None) };
    if t.dtype() != DType::F32 {
        return Err(Error::invalid("alibi_slopes", "dtype f32", t.dtype()));
    }
    let per_batch = match t.shape() {
        [n] if *n == h => false,
        [bb, n] if *bb == batch && *n == h => true,
        s => return Err(Error::invalid("alibi_slopes", format!("shape [{h}] or [{batch}, {h}]"), format!("{s:?}"))),
    };
    let slopes = t.to_f32_vec();
    if let Some(x) = slopes.iter().find(|x| !x.is_finite()) {
        return Err(Error::invalid("alibi_slopes", "finite values", x));
    }
    Ok(Some(Alibi { slopes, per_batch }))
}

fn check_cu(arg: &'static str, cu: &[i32], batch: usize, total: usize) -> Result<Vec<usize>> {
    if cu.len() != batch + 1 {
        return Err(Error::invalid(arg, format!("{} entries (batch + 1)", batch + 1), cu.len()));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(arg, "to start at 0", cu[0]));
    }
    for w in 0..batch {
        if cu[w + 1] < cu[w] {
            return Err(Error::invalid(
                arg,
                "non-decreasing values",
                format!("{} after {} at index {}", cu[w + 1], cu[w], w + 1),
            ));
        }
    }
    if cu[batch] as i64 != total as i64 {
        return Err(Error::invalid(arg, format!("last value = total rows {total}"), cu[batch]));
    }
    Ok(cu.iter().map(|&x| x as usize).collect())
}

/// Validates a forward (or the shared part of a backward) call and normalises it.
pub fn validate(q: &TensorView<'_>, k: &TensorView<'_>, v: &TensorView<'_>, opts: &AttnOptions) -> Result<Problem> {
    check_view("q", q)?;
    check_view("k", k)?;
    check_view("v", v)?;
    let dtype = q.dtype();
    if !dtype.is_float() {
        return Err(Error::invalid("q", "dtype f16, bf16, f32 or e4m3", dtype));
    }
    for (arg, t) in [("k", k), ("v", v)] {
        if t.dtype() != dtype {
            let hint = if t.dtype().is_fp8() { "; FP8 keys and values with a 16-bit q: the KV-cache path" } else { "" };
            return Err(Error::invalid(arg, format!("dtype {dtype} (as q{hint})"), t.dtype()));
        }
        if t.device() != q.device() {
            return Err(Error::invalid(arg, format!("device {} (as q)", q.device()), t.device()));
        }
    }
    let varlen = opts.varlen.is_some();
    let rank = if varlen { 3 } else { 4 };
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        if t.shape().len() != rank {
            let want = if varlen { "rank 3 [total, heads, d] (varlen)" } else { "rank 4 [b, seqlen, heads, d]" };
            return Err(Error::invalid(arg, want, format!("shape {:?}", t.shape())));
        }
    }
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let d = qs[rank - 1];
    check_head_dim(d)?;
    let (h, hk) = (qs[rank - 2], ks[rank - 2]);
    if ks[rank - 1] != d {
        return Err(Error::invalid("k", format!("head dim {d} (as q)"), ks[rank - 1]));
    }
    // v matches k but for its last dim, the value head dim.
    if vs[..rank - 1] != ks[..rank - 1] {
        let mut want = ks.to_vec();
        want.pop();
        return Err(Error::invalid(
            "v",
            format!("shape {want:?} + [d_v] (as k but for the head dim)"),
            format!("{vs:?}"),
        ));
    }
    let d_v = vs[rank - 1];
    check_value_head_dim("v", d_v)?;
    check_heads(h, hk)?;
    let scale = check_finite_scale(opts.softmax_scale, d)?;
    let softcap = check_softcap(opts.softcap)?;
    let mask = Mask::new(opts.causal, opts.window)?;

    let (batch, seqlen_q, seqlen_k, q_start, k_start, total_q, total_k, cu, seqused);
    if let Some(vl) = &opts.varlen {
        batch = vl.cu_seqlens_q.len().saturating_sub(1);
        if vl.cu_seqlens_q.is_empty() {
            return Err(Error::invalid("cu_seqlens_q", "at least 1 entry (batch + 1)", 0));
        }
        check_batch("cu_seqlens_q", batch)?;
        total_q = qs[0];
        total_k = ks[0];
        let cq = check_cu("cu_seqlens_q", &vl.cu_seqlens_q, batch, total_q)?;
        let ck = check_cu("cu_seqlens_k", &vl.cu_seqlens_k, batch, total_k)?;
        seqlen_q = cq.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
        let mut sk: Vec<usize> = ck.windows(2).map(|w| w[1] - w[0]).collect();
        if let Some(used) = &vl.seqused_k {
            if used.len() != batch {
                return Err(Error::invalid("seqused_k", format!("{batch} entries"), used.len()));
            }
            for (i, (&u, s)) in used.iter().zip(sk.iter_mut()).enumerate() {
                if u < 0 || u as usize > *s {
                    return Err(Error::invalid("seqused_k", format!("values in 0..={} for sequence {i}", *s), u));
                }
                *s = u as usize;
            }
        }
        seqlen_k = sk;
        q_start = cq[..batch].to_vec();
        k_start = ck[..batch].to_vec();
        cu = Some((vl.cu_seqlens_q.clone(), vl.cu_seqlens_k.clone()));
        seqused = vl.seqused_k.clone();
    } else {
        batch = qs[0];
        check_batch("q", batch)?;
        if ks[0] != batch {
            return Err(Error::invalid("k", format!("batch {batch} (as q)"), ks[0]));
        }
        let (sq, sk) = (qs[1], ks[1]);
        seqlen_q = vec![sq; batch];
        seqlen_k = vec![sk; batch];
        q_start = (0..batch).map(|i| i * sq).collect();
        k_start = (0..batch).map(|i| i * sk).collect();
        total_q = batch * sq;
        total_k = batch * sk;
        cu = None;
        seqused = None;
    }
    let alibi = check_alibi(opts, batch, h)?;
    let sink = check_sink(opts, h)?;
    let (dtype, out_dtype, descale) = check_fp8(opts, dtype, k.dtype(), "k", false, batch, hk)?;
    Ok(Problem {
        dtype,
        out_dtype,
        descale,
        batch,
        h,
        hk,
        d,
        d_v,
        q: row_map(&q.layout, varlen, &q_start),
        k: row_map(&k.layout, varlen, &k_start),
        v: row_map(&v.layout, varlen, &k_start),
        seqlen_q,
        seqlen_k,
        q_start,
        k_start,
        total_q,
        dense_sq: if varlen { 0 } else { qs[1] },
        total_k,
        varlen,
        scale,
        softcap,
        alibi,
        mask,
        cu_seqlens: cu,
        seqused_k: seqused,
        sink,
        tuning: opts.tuning.clone(),
    })
}
