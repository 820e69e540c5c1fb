//! KV-cache attention (inference): append new keys/values in place, optionally rotated (RoPE), then attend
//! over the cache. Paged caches (`block_table`, any page size), per-sequence cache rows (`cache_batch_idx`)
//! and left padding (`cache_leftpad`) are supported.
//!
//! The values are a cache of their own ([`Values::Separate`], the common case, [`KvCache::new`]) or the first
//! `d_v` columns of the key cache ([`Values::KeyPrefix`], [`KvCache::key_prefix_values`]): multi-head latent
//! attention (DeepSeek's MLA) decodes in its absorbed form with d = 576 and `v = k_cache[..., :512]`, which two
//! disjoint mutable views cannot express. Head dims go up to [`MAX_KV_HEAD_DIM`] (576) on this path.
//!
//! The call is split in two so every backend (and the test oracle) shares one validation and append:
//! [`prepare`] checks everything, refuses appends that would overflow, writes the new rows and returns a
//! [`KvPlan`]; the backend then runs attention over the plan's [`Problem`].

use crate::api::ForwardOutput;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::AttnOptions;
use crate::problem::{
    check_alibi, check_batch, check_finite_scale, check_fp8, check_head_dim_up_to, check_heads_of, check_softcap,
    check_value_head_dim_up_to, check_view, Paged, Problem, RowMap, MAX_KV_HEAD_DIM,
};
use crate::semantics::Mask;
use crate::tensor::{Layout, RawMut, Tensor, TensorView, TensorViewMut};

/// Tokens already in the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheSeqlens {
    /// The same count for every sequence.
    All(i32),
    /// One count per sequence (`[b]`).
    PerSeq(Vec<i32>),
}

/// Rotary embedding tables: `cos`, `sin` of shape `[s_ro, rot / 2]` (`rot <= d`, even), `f32` or q's dtype.
#[derive(Debug, Clone)]
pub struct Rotary<'a> {
    /// Cosines, `[s_ro, rot / 2]`.
    pub cos: TensorView<'a>,
    /// Sines, `[s_ro, rot / 2]`.
    pub sin: TensorView<'a>,
    /// Interleaved pairs `(0,1), (2,3), ...`; otherwise pairs `(k, k + rot/2)`.
    pub interleaved: bool,
}

/// Where a KV cache's values are.
#[derive(Debug)]
pub enum Values<'a> {
    /// A value cache of its own: `k_cache`'s shape but for the last dim, the value head dim `d_v` (may differ
    /// from `d`), in memory disjoint from `k_cache`. `v_new` is appended to it.
    Separate(TensorViewMut<'a>),
    /// The values are the first `d_v` columns of the key cache: `v[.., j, kh, :d_v] = k_cache[.., j, kh, :d_v]`,
    /// before and after any append (multi-head latent attention, DeepSeek's MLA in its absorbed form: d = 576,
    /// d_v = 512, `v_cache = k_cache[..., :512]`). Nothing is stored apart: appending `k_new` appends its first
    /// `d_v` columns as the new values, so `v_new` must be `None`. Requires `1 <= d_v <= d`. Rotary is refused in
    /// this form: this library's rotary turns the first `rot` columns of each new key, which are value columns
    /// here, so the values would be rotated too (DeepSeek rotates only the last 64 "rope" columns, outside the
    /// first 512: apply that rotation to `k_new` and `q` before the call).
    KeyPrefix {
        /// The value head dim: how many leading columns of each key row are its value.
        d_v: usize,
    },
}

impl<'a> From<TensorViewMut<'a>> for Values<'a> {
    fn from(v: TensorViewMut<'a>) -> Self {
        Values::Separate(v)
    }
}

/// The cache and what to do with it.
#[derive(Debug)]
pub struct KvCache<'a> {
    /// `[b_cache, s_cache, hk, d]`, or `[num_pages, page_size, hk, d]` with a block table.
    pub k_cache: TensorViewMut<'a>,
    /// The values: a cache of their own ([`Values::Separate`]: `k_cache`'s shape but for the last dim, the value
    /// head dim `d_v`, which may differ from `d`), or the first `d_v` columns of `k_cache` ([`Values::KeyPrefix`]).
    pub v_cache: Values<'a>,
    /// New keys `[b, s_new, hk, d]`, appended at `cache_seqlens` (in place). With [`Values::KeyPrefix`] their
    /// first `d_v` columns are the new values.
    pub k_new: Option<TensorView<'a>>,
    /// New values `[b, s_new, hk, d_v]` (as `k_new`, with v_cache's head dim), never rotated. `None` with
    /// [`Values::KeyPrefix`] (the values come with `k_new`).
    pub v_new: Option<TensorView<'a>>,
    /// Tokens already in the cache.
    pub cache_seqlens: CacheSeqlens,
    /// `i32` `[b, max_pages]`: paged cache.
    pub block_table: Option<Tensor>,
    /// Rotary embedding of the new keys (and of q). Refused with [`Values::KeyPrefix`].
    pub rotary: Option<Rotary<'a>>,
    /// `[b]`: sequence `i` uses cache row `cache_batch_idx[i]` (not with paging).
    pub cache_batch_idx: Option<Vec<i32>>,
    /// `[b]`: sequence `i`'s keys start at `cache_leftpad[i]` (not with paging).
    pub cache_leftpad: Option<Vec<i32>>,
}

impl<'a> KvCache<'a> {
    /// A cache with values of their own and nothing to append: attend over `cache_seqlens` tokens.
    pub fn new(k_cache: TensorViewMut<'a>, v_cache: TensorViewMut<'a>, cache_seqlens: CacheSeqlens) -> Self {
        Self::with_values(k_cache, Values::Separate(v_cache), cache_seqlens)
    }

    /// A cache whose values are the first `d_v` columns of `k_cache` ([`Values::KeyPrefix`]; MLA decoding:
    /// `d_v = 512` of `d = 576`), with nothing to append. Set `k_new` to append (its first `d_v` columns become
    /// the new values; `v_new` stays `None`).
    ///
    /// ```
    /// use flashattn::{kvcache_forward, AttnOptions, CacheSeqlens, DType, KvCache, Tensor};
    /// let (b, h, d, d_v) = (1, 8, 576, 512); // 8 query heads over one latent KV head
    /// let q = Tensor::from_f32(&vec![0.01; b * h * d], &[b, 1, h, d], DType::BF16)?;
    /// let mut kc = Tensor::zeros(&[b, 64, 1, d], DType::BF16);
    /// let k_new = Tensor::from_f32(&vec![0.5; b * d], &[b, 1, 1, d], DType::BF16)?;
    /// let mut cache = KvCache::key_prefix_values(kc.view_mut(), d_v, CacheSeqlens::All(10));
    /// cache.k_new = Some(k_new.view());
    /// let out = kvcache_forward(&q.view(), &mut cache, &AttnOptions::default().causal())?;
    /// assert_eq!(out.o.shape(), &[b, 1, h, d_v]);
    /// # Ok::<(), flashattn::Error>(())
    /// ```
    pub fn key_prefix_values(k_cache: TensorViewMut<'a>, d_v: usize, cache_seqlens: CacheSeqlens) -> Self {
        Self::with_values(k_cache, Values::KeyPrefix { d_v }, cache_seqlens)
    }

    /// A cache with the given values and nothing to append.
    pub fn with_values(k_cache: TensorViewMut<'a>, v_cache: Values<'a>, cache_seqlens: CacheSeqlens) -> Self {
        KvCache {
            k_cache,
            v_cache,
            k_new: None,
            v_new: None,
            cache_seqlens,
            block_table: None,
            rotary: None,
            cache_batch_idx: None,
            cache_leftpad: None,
        }
    }

    /// The values as a read-only view: the value cache, or with [`Values::KeyPrefix`] the first `d_v` columns of
    /// `k_cache` (a view of the same memory, `k_cache`'s strides). Refused (`v_cache`) when `d_v` is not in
    /// `1..=d`.
    pub fn v_view(&self) -> Result<TensorView<'_>> {
        match &self.v_cache {
            Values::Separate(v) => Ok(v.as_view()),
            &Values::KeyPrefix { d_v } => {
                let mut layout = self.k_cache.layout.clone();
                check_key_prefix(d_v, &layout.shape)?;
                layout.shape[3] = d_v;
                Ok(TensorView { data: self.k_cache.data.as_slice(), layout })
            }
        }
    }

    /// Whether the values are the first columns of the key cache ([`Values::KeyPrefix`]).
    pub fn key_prefix(&self) -> bool {
        matches!(self.v_cache, Values::KeyPrefix { .. })
    }
}

/// Checks the value head dim of [`Values::KeyPrefix`] against `k_cache`'s shape (rank 4, head dim `d`): `1 <= d_v
/// <= d`, blamed on `v_cache`.
fn check_key_prefix(d_v: usize, k_shape: &[usize]) -> Result<()> {
    let d = match *k_shape {
        [_, _, _, d] => d,
        _ => return Err(Error::invalid("k_cache", "rank 4", format!("shape {k_shape:?}"))),
    };
    if d_v == 0 || d_v > d {
        return Err(Error::invalid(
            "v_cache",
            format!("key-prefix values with d_v in 1..={d} (the first d_v of k_cache's {d} columns)"),
            format!("d_v = {d_v}"),
        ));
    }
    Ok(())
}

/// A validated KV-cache call whose append has been done.
#[derive(Debug, Clone)]
pub struct KvPlan {
    /// The attention problem over the cache (k/v row maps point into the cache).
    pub problem: Problem,
    /// The rotated query, when rotary is on (q's shape and dtype); otherwise `None` (use q itself).
    pub q_rotated: Option<Tensor>,
}

fn vec_arg(arg: &'static str, v: &Option<Vec<i32>>, b: usize) -> Result<Option<Vec<usize>>> {
    let Some(v) = v else { return Ok(None) };
    if v.len() != b {
        return Err(Error::invalid(arg, format!("{b} entries"), v.len()));
    }
    v.iter()
        .map(|&x| usize::try_from(x).map_err(|_| Error::invalid(arg, "values >= 0", x)))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Rotates `x` (length `d`) in place at table row `pos`.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for kk in 0..half {
        let (a, b) = if interleaved { (2 * kk, 2 * kk + 1) } else { (kk, kk + half) };
        let (x1, x2) = (x[a], x[b]);
        x[a] = x1 * cos[kk] - x2 * sin[kk];
        x[b] = x1 * sin[kk] + x2 * cos[kk];
    }
}

/// Rotary tables as `f32`, validated: `cos`/`sin` are `[s_ro, half]` row-major.
#[derive(Debug, Clone)]
pub(crate) struct RotTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub interleaved: bool,
}

/// A validated KV-cache call before anything is written: what every backend needs to append and attend.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The attention problem over the cache after the append (q's rows as given, not rotated).
    pub problem: Problem,
    /// Tokens already in the cache, per sequence.
    pub seqlens: Vec<usize>,
    /// Rows appended per sequence.
    pub s_new: usize,
    /// Left padding per sequence (zeros when none).
    pub leftpad: Vec<usize>,
    /// Rotary tables.
    pub rot: Option<RotTables>,
}

/// Validates a KV-cache call, appends `k_new`/`v_new` (rotated) into the cache, and returns the plan.
/// Nothing is written when any check fails.
pub fn prepare(q: &TensorView<'_>, cache: &mut KvCache<'_>, opts: &AttnOptions) -> Result<KvPlan> {
    let c = check(q, cache, opts)?;
    let Checked { mut problem, seqlens, s_new, leftpad: lp, rot } = c;
    let (b, sq, h, hk, d) = (problem.batch, problem.dense_sq, problem.h, problem.hk, problem.d);
    let d_v = problem.d_v;
    let rot = rot.map(|r| (r.cos, r.sin, r.half, r.interleaved));
    let mask = problem.mask;

    // All checks passed: append. 16-bit rows appended to an FP8 cache are divided by its descale (the stored
    // value is `round_e4m3(x / descale)`); FP8 rows are stored as they are.
    if let (Some(kn), true) = (&cache.k_new, s_new > 0) {
        let quantize = |t: &TensorView<'_>, f: fn(&Problem, usize, usize) -> f32| -> Option<Vec<f32>> {
            (problem.is_fp8() && !t.dtype().is_fp8()).then(|| {
                (0..b).flat_map(|i| (0..hk).map(move |kh| (i, kh))).map(|(i, kh)| f(&problem, i, kh)).collect()
            })
        };
        let kraw = cache.k_cache.data.raw();
        let kdiv = quantize(kn, Problem::k_scale);
        append(kn, &kraw, &problem.k, &seqlens, &lp, hk, d, rot.as_ref(), kdiv.as_deref());
        // Key-prefix values were written with the keys (`check` refused a v_new and rotary in that form).
        if let (Values::Separate(vc), Some(vn)) = (&mut cache.v_cache, &cache.v_new) {
            let vraw = vc.data.raw();
            let vdiv = quantize(vn, Problem::v_scale);
            append(vn, &vraw, &problem.v, &seqlens, &lp, hk, d_v, None, vdiv.as_deref());
        }
    }

    // Rotated q: in q's dtype; an FP8 q is rotated after its descale, into f32 (its descale is then 1).
    let q_fp8 = q.dtype().is_fp8();
    let q_rotated = rot.as_ref().map(|(cos, sin, half, inter)| {
        let mut out = Tensor::zeros(&[b, sq, h, d], if q_fp8 { DType::F32 } else { q.dtype() });
        let raw = out.view_mut().data.raw();
        let mut row = vec![0f32; d];
        for (i, &n) in seqlens.iter().enumerate() {
            for t in 0..sq {
                let pos = if mask.is_active() { n + t } else { n };
                for hh in 0..h {
                    q.data.read_f32(q.layout.index(&[i, t, hh, 0]), &mut row);
                    if q_fp8 {
                        let m = problem.q_scale(i, hh);
                        row.iter_mut().for_each(|x| *x *= m);
                    }
                    rotate(&mut row, &cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half], *inter);
                    raw.write_f32(((i * sq + t) * h + hh) * d, &row);
                }
            }
        }
        out
    });
    if let Some(t) = &q_rotated {
        problem.q = q_row_map(t.layout(), b);
        if let (Some(ds), true) = (&mut problem.descale, q_fp8) {
            ds.q.iter_mut().for_each(|x| *x = 1.0);
        }
    }
    Ok(KvPlan { problem, q_rotated })
}

fn q_row_map(l: &Layout, b: usize) -> RowMap {
    RowMap {
        base: (0..b).map(|i| l.offset.wrapping_add(i.wrapping_mul(l.strides[0]))).collect(),
        row_stride: l.strides[1],
        head_stride: l.strides[2],
        paged: None,
    }
}

/// Validates a KV-cache call without writing anything (shared by every backend).
pub(crate) fn check(q: &TensorView<'_>, cache: &KvCache<'_>, opts: &AttnOptions) -> Result<Checked> {
    check_view("q", q)?;
    if opts.varlen.is_some() {
        return Err(Error::invalid("varlen", "no varlen with a KV cache (use cache_seqlens)", "cu_seqlens"));
    }
    let dtype = q.dtype();
    if !dtype.is_float() {
        return Err(Error::invalid("q", "dtype f16, bf16 or f32", dtype));
    }
    let [b, sq, h, d] = match *q.shape() {
        [b, s, h, d] => [b, s, h, d],
        _ => return Err(Error::invalid("q", "rank 4 [b, sq_new, h, d]", format!("shape {:?}", q.shape()))),
    };
    check_head_dim_up_to(d, MAX_KV_HEAD_DIM)?;
    check_batch("q", b)?;
    // The caches: k_cache of q's dtype (or e4m3), a separate v_cache of k_cache's; each rank 4 and without
    // overlapping elements (they are written in place).
    let separate = match &cache.v_cache {
        Values::Separate(v) => Some(v),
        Values::KeyPrefix { .. } => None,
    };
    for (arg, t) in std::iter::once(("k_cache", &cache.k_cache)).chain(separate.map(|v| ("v_cache", v))) {
        let view = t.as_view();
        check_view(arg, &view)?;
        let want = if arg == "v_cache" { cache.k_cache.dtype() } else { dtype };
        // An FP8 cache may go with an FP8 or a 16-bit q (checked by `check_fp8` below).
        if t.dtype() != want && !(arg == "k_cache" && t.dtype().is_fp8()) {
            let of = if arg == "v_cache" { "k_cache" } else { "q" };
            return Err(Error::invalid(arg, format!("dtype {want} (as {of})"), t.dtype()));
        }
        if t.shape().len() != 4 {
            return Err(Error::invalid(arg, "rank 4", format!("shape {:?}", t.shape())));
        }
        if !t.layout.is_non_overlapping() {
            return Err(Error::invalid(
                arg,
                "a layout whose elements do not overlap",
                format!("strides {:?}", t.layout.strides),
            ));
        }
    }
    let cs = cache.k_cache.shape().to_vec();
    // The values' view: the value cache, or k_cache's first d_v columns (`v_view` checks d_v against d). It
    // matches k_cache but for its last dim, the value head dim.
    let vview = cache.v_view()?;
    if vview.shape()[..3] != cs[..3] {
        return Err(Error::invalid(
            "v_cache",
            format!("shape {:?} + [d_v] (as k_cache but for the head dim)", &cs[..3]),
            format!("{:?}", vview.shape()),
        ));
    }
    let d_v = vview.shape()[3];
    check_value_head_dim_up_to("v_cache", d_v, MAX_KV_HEAD_DIM)?;
    let vl = vview.layout.clone();
    let hk = cs[2];
    if cs[3] != d {
        return Err(Error::invalid("k_cache", format!("head dim {d} (as q)"), cs[3]));
    }
    check_heads_of(h, hk, "k_cache")?;
    let kv_dtype = cache.k_cache.dtype();
    let (pdtype, out_dtype, mut descale) = check_fp8(opts, dtype, kv_dtype, "k_cache", true, b, hk)?;
    let scale = check_finite_scale(opts.softmax_scale, d)?;
    let softcap = check_softcap(opts.softcap)?;
    let mask = Mask::new(opts.causal, opts.window)?;
    let alibi = check_alibi(opts, b, h)?;

    let seqlens: Vec<usize> = match &cache.cache_seqlens {
        CacheSeqlens::All(n) => {
            let n = usize::try_from(*n).map_err(|_| Error::invalid("cache_seqlens", "a value >= 0", n))?;
            vec![n; b]
        }
        CacheSeqlens::PerSeq(v) => vec_arg("cache_seqlens", &Some(v.clone()), b)?.unwrap_or_default(),
    };
    let key_prefix = cache.key_prefix();
    if key_prefix {
        if let Some(vn) = &cache.v_new {
            return Err(Error::invalid(
                "v_new",
                format!(
                    "none with key-prefix values (Values::KeyPrefix: appending k_new appends its first {d_v} columns \
                     as the values)"
                ),
                format!("a tensor of shape {:?}", vn.shape()),
            ));
        }
        if let Some(t) = &opts.v_descale {
            return Err(Error::invalid(
                "v_descale",
                "none with key-prefix values (they are k_cache's elements, dequantized with k_descale)",
                format!("a {} tensor of shape {:?}", t.dtype(), t.shape()),
            ));
        }
        if cache.rotary.is_some() {
            return Err(Error::invalid(
                "rotary_cos",
                "no rotary with key-prefix values (it would turn the first rot columns of k_new, which are value \
                 columns too; rotate the rope columns of k_new and q before the call)",
                "rotary tables",
            ));
        }
    }
    if let (Some(ds), true) = (&mut descale, key_prefix) {
        // Key-prefix values are the key cache's own elements: the key descale dequantizes them.
        ds.v = ds.k.clone();
    }
    let new_rows = |arg: &'static str, t: &TensorView<'_>| -> Result<()> {
        check_view(arg, t)?;
        if kv_dtype.is_fp8() {
            // Appended to an FP8 cache: FP8 rows as they are, 16-bit rows quantized with the descale.
            if !matches!(t.dtype(), DType::E4M3 | DType::F16 | DType::BF16) {
                return Err(Error::invalid(arg, "dtype e4m3, f16 or bf16 (appended to an e4m3 cache)", t.dtype()));
            }
        } else if t.dtype() != dtype {
            return Err(Error::invalid(arg, format!("dtype {dtype} (as q)"), t.dtype()));
        }
        Ok(())
    };
    let s_new = match (&cache.k_new, &cache.v_new) {
        (None, None) => 0,
        (Some(kn), vn) if vn.is_some() || key_prefix => {
            new_rows("k_new", kn)?;
            if let Some(vn) = vn {
                new_rows("v_new", vn)?;
            }
            let want = [b, kn.shape().get(1).copied().unwrap_or(0), hk, d];
            if kn.shape() != want {
                return Err(Error::invalid("k_new", format!("shape {want:?}"), format!("{:?}", kn.shape())));
            }
            let want_v = [b, want[1], hk, d_v];
            if let Some(vn) = vn.as_ref().filter(|vn| vn.shape() != want_v) {
                return Err(Error::invalid(
                    "v_new",
                    format!("shape {want_v:?} (as k_new, with v_cache's head dim)"),
                    format!("{:?}", vn.shape()),
                ));
            }
            want[1]
        }
        (Some(_), _) => return Err(Error::invalid("v_new", "a tensor when k_new is given", "none")),
        (None, Some(_)) => return Err(Error::invalid("k_new", "a tensor when v_new is given", "none")),
    };

    // Addressing of the cache (key-prefix values: v's rows are k's, so its map is k's).
    let kl = cache.k_cache.layout.clone();
    let batch_idx = vec_arg("cache_batch_idx", &cache.cache_batch_idx, b)?;
    let leftpad = vec_arg("cache_leftpad", &cache.cache_leftpad, b)?;
    let (k_map, v_map) = if let Some(bt) = &cache.block_table {
        if batch_idx.is_some() {
            return Err(Error::invalid("cache_batch_idx", "none with a paged cache (block_table)", "a tensor"));
        }
        if leftpad.is_some() {
            return Err(Error::invalid("cache_leftpad", "none with a paged cache (block_table)", "a tensor"));
        }
        if bt.dtype() != DType::I32 || bt.shape().len() != 2 || bt.shape()[0] != b {
            return Err(Error::invalid(
                "block_table",
                format!("i32 of shape [{b}, max_pages]"),
                format!("{} of shape {:?}", bt.dtype(), bt.shape()),
            ));
        }
        let max_pages = bt.shape()[1];
        let (num_pages, page_size) = (cs[0], cs[1]);
        if page_size == 0 {
            return Err(Error::invalid("k_cache", "a page size >= 1", 0));
        }
        let table = bt.view().to_i32_vec().unwrap_or_default();
        // Saturating: an empty cache (0 pages) may have any page size and block-table width.
        let cap = max_pages.saturating_mul(page_size);
        for (i, &n) in seqlens.iter().enumerate() {
            let used = n + s_new;
            if used > cap {
                return Err(Error::CacheOverflow { seq: i, needed: used, capacity: cap });
            }
            for pg in 0..used.div_ceil(page_size) {
                let e = table[i * max_pages + pg];
                if e < 0 || e as usize >= num_pages {
                    return Err(Error::invalid(
                        "block_table",
                        format!("page indices in 0..{num_pages}"),
                        format!("{e} at [{i}, {pg}]"),
                    ));
                }
            }
        }
        let map = |l: &Layout| RowMap {
            base: vec![0; b],
            row_stride: l.strides[1],
            head_stride: l.strides[2],
            paged: Some(Paged {
                table: table.clone(),
                max_pages,
                page_size,
                page_stride: l.strides[0],
                offset: l.offset,
            }),
        };
        (map(&kl), map(&vl))
    } else {
        let (b_cache, s_cache) = (cs[0], cs[1]);
        let rows: Vec<usize> = match &batch_idx {
            Some(idx) => {
                if let Some((i, &r)) = idx.iter().enumerate().find(|(_, &r)| r >= b_cache) {
                    return Err(Error::invalid(
                        "cache_batch_idx",
                        format!("values in 0..{b_cache}"),
                        format!("{r} at {i}"),
                    ));
                }
                idx.clone()
            }
            None => {
                if b_cache < b {
                    return Err(Error::invalid("k_cache", format!("at least {b} cache rows (batch)"), b_cache));
                }
                (0..b).collect()
            }
        };
        for (i, &n) in seqlens.iter().enumerate() {
            if n + s_new > s_cache {
                return Err(Error::CacheOverflow { seq: i, needed: n + s_new, capacity: s_cache });
            }
        }
        if s_new > 0 {
            // A set, not a `b_cache` table: an empty cache may have any number of rows.
            let mut seen = std::collections::HashSet::new();
            for (i, &r) in rows.iter().enumerate() {
                if !seen.insert(r) {
                    return Err(Error::invalid(
                        "cache_batch_idx",
                        "distinct cache rows when appending (two sequences would write the same row)",
                        format!("row {r} repeated at {i}"),
                    ));
                }
            }
        }
        let lp = leftpad.clone().unwrap_or_else(|| vec![0; b]);
        let map = |l: &Layout| RowMap {
            // Wrapping: exact for the rows read; an empty cache's layout (or a leftpad refused below) may overflow.
            base: rows
                .iter()
                .zip(&lp)
                .map(|(&r, &p)| {
                    l.offset.wrapping_add(r.wrapping_mul(l.strides[0])).wrapping_add(p.wrapping_mul(l.strides[1]))
                })
                .collect(),
            row_stride: l.strides[1],
            head_stride: l.strides[2],
            paged: None,
        };
        (map(&kl), map(&vl))
    };
    let lp = leftpad.unwrap_or_else(|| vec![0; b]);
    for (i, (&p, &n)) in lp.iter().zip(&seqlens).enumerate() {
        if p > n {
            return Err(Error::invalid("cache_leftpad", format!("a value <= cache_seqlens[{i}] = {n}"), p));
        }
    }
    // Paged appends must not write one (page, row) from two sequences.
    if let (Some(pg), true) = (&k_map.paged, s_new > 0) {
        let mut seen = std::collections::HashSet::new();
        for (i, &n) in seqlens.iter().enumerate() {
            for t in n..n + s_new {
                let page = pg.table[i * pg.max_pages + t / pg.page_size];
                if !seen.insert((page, t % pg.page_size)) {
                    return Err(Error::invalid(
                        "block_table",
                        "distinct pages for the rows being appended",
                        format!("page {page} row {} written by two sequences", t % pg.page_size),
                    ));
                }
            }
        }
    }

    // Rotary tables.
    let rot = match &cache.rotary {
        None => None,
        Some(r) => {
            if s_new == 0 {
                return Err(Error::invalid("rotary_cos", "rotary only together with k_new", "no k_new"));
            }
            for (arg, t) in [("rotary_cos", &r.cos), ("rotary_sin", &r.sin)] {
                check_view(arg, t)?;
                if !(t.dtype() == DType::F32 || t.dtype() == dtype) {
                    return Err(Error::invalid(arg, format!("dtype f32 or {dtype}"), t.dtype()));
                }
                if t.shape().len() != 2 {
                    return Err(Error::invalid(arg, "shape [s_ro, rot / 2]", format!("{:?}", t.shape())));
                }
            }
            if r.sin.shape() != r.cos.shape() {
                return Err(Error::invalid(
                    "rotary_sin",
                    format!("shape {:?} (as rotary_cos)", r.cos.shape()),
                    format!("{:?}", r.sin.shape()),
                ));
            }
            let (s_ro, half) = (r.cos.shape()[0], r.cos.shape()[1]);
            if half == 0 || 2 * half > d {
                return Err(Error::invalid("rotary_cos", format!("rot / 2 in 1..={} (rot <= d = {d})", d / 2), half));
            }
            // Keys use positions n..n + s_new; queries n..n + sq with a mask (see "Rotated q"), else n.
            let rows = if mask.is_active() { s_new.max(sq) } else { s_new };
            let need = seqlens.iter().map(|&n| n + rows).max().unwrap_or(0);
            if s_ro < need {
                return Err(Error::invalid("rotary_cos", format!("at least {need} rows (positions used)"), s_ro));
            }
            let (cos, sin) = (r.cos.to_f32_vec(), r.sin.to_f32_vec());
            if cos.iter().chain(&sin).any(|x| !x.is_finite()) {
                return Err(Error::invalid("rotary_cos", "finite values", "a non-finite value"));
            }
            Some((cos, sin, half, r.interleaved))
        }
    };

    let seqlen_k: Vec<usize> = seqlens.iter().zip(&lp).map(|(&n, &p)| n + s_new - p).collect();
    let q_start: Vec<usize> = (0..b).map(|i| i * sq).collect();
    let mut k_start = Vec::with_capacity(b);
    let mut acc = 0;
    for &n in &seqlen_k {
        k_start.push(acc);
        acc += n;
    }
    let problem = Problem {
        dtype: pdtype,
        out_dtype,
        descale,
        batch: b,
        h,
        hk,
        d,
        d_v,
        seqlen_q: vec![sq; b],
        seqlen_k,
        q_start,
        k_start,
        total_q: b * sq,
        dense_sq: sq,
        total_k: acc,
        varlen: false,
        scale,
        softcap,
        alibi,
        mask,
        q: q_row_map(&q.layout, b),
        k: k_map,
        v: v_map,
        cu_seqlens: None,
        seqused_k: None,
        sink: crate::problem::check_sink(opts, h)?,
        tuning: opts.tuning.clone(),
    };
    let rot = rot.map(|(cos, sin, half, interleaved)| RotTables { cos, sin, half, interleaved });
    Ok(Checked { problem, seqlens, s_new, leftpad: lp, rot })
}

#[allow(clippy::too_many_arguments)]
fn append(
    new: &TensorView<'_>,
    dst: &RawMut,
    map: &RowMap,
    seqlens: &[usize],
    leftpad: &[usize],
    hk: usize,
    d: usize,
    rot: Option<&(Vec<f32>, Vec<f32>, usize, bool)>,
    descale: Option<&[f32]>,
) {
    let mut row = vec![0f32; d];
    let s_new = new.shape()[1];
    for (i, (&n, &lp)) in seqlens.iter().zip(leftpad).enumerate() {
        for t in 0..s_new {
            let pos = n + t;
            for kh in 0..hk {
                new.data.read_f32(new.layout.index(&[i, t, kh, 0]), &mut row);
                if let Some((cos, sin, half, inter)) = rot {
                    rotate(&mut row, &cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half], *inter);
                }
                if let Some(ds) = descale {
                    let m = ds[i * hk + kh];
                    row.iter_mut().for_each(|x| *x /= m);
                }
                // The map's base already points at `leftpad` for unpaged caches; positions are absolute.
                dst.write_f32(map.at(i, pos - lp, kh), &row);
            }
        }
    }
}

/// KV-cache attention on the host: validates, appends in place, then runs the flash forward.
///
/// ```
/// use flashattn::{kvcache_forward, AttnOptions, CacheSeqlens, DType, KvCache, Tensor};
/// let q = Tensor::from_f32(&vec![0.1; 1 * 1 * 4 * 16], &[1, 1, 4, 16], DType::BF16)?;
/// let mut kc = Tensor::zeros(&[1, 32, 2, 16], DType::BF16);
/// let mut vc = Tensor::zeros(&[1, 32, 2, 16], DType::BF16);
/// let kn = Tensor::from_f32(&vec![0.2; 1 * 1 * 2 * 16], &[1, 1, 2, 16], DType::BF16)?;
/// let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(7));
/// cache.k_new = Some(kn.view());
/// cache.v_new = Some(kn.view());
/// let out = kvcache_forward(&q.view(), &mut cache, &AttnOptions::default().causal())?;
/// assert_eq!(out.o.shape(), &[1, 1, 4, 16]);
/// # Ok::<(), flashattn::Error>(())
/// ```
pub fn kvcache_forward(q: &TensorView<'_>, cache: &mut KvCache<'_>, opts: &AttnOptions) -> Result<ForwardOutput> {
    let plan = prepare(q, cache, opts)?;
    let p = &plan.problem;
    // The test hook `Tuning::poison_outputs`: NaN-filled outputs, so an element the backend does not write fails.
    let alloc = if p.tuning.poison_outputs { Tensor::try_nan } else { Tensor::try_zeros };
    let mut o = alloc(&p.o_shape(), p.out_dtype)?;
    let mut lse = alloc(&p.lse_shape(), DType::F32)?;
    let qv = plan.q_rotated.as_ref().map(|t| t.view()).unwrap_or_else(|| q.clone());
    {
        let k = cache.k_cache.as_view();
        let v = cache.v_view()?;
        let o_map = p.q_like_map(o.layout());
        let out =
            crate::cpu::flash::FwdOut { o: o.view_mut().data.raw(), o_map: &o_map, lse: lse.view_mut().data.raw() };
        crate::cpu::flash::forward(p, crate::cpu::flash::Qkv { q: qv.data, k: k.data, v: v.data }, &out);
    }
    Ok(ForwardOutput { o, lse })
}
