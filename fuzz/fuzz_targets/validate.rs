//! Fuzz target for flashattn's validation layer (`problem.rs`, `kvcache.rs`, `api.rs`, `tensor.rs`).
//!
//! From arbitrary bytes it builds small tensors (dims 0..=9, head dims up to 300, every dtype including
//! `i32`, padded / permuted / broadcast / non-contiguous / out-of-bounds / overflowing layouts set directly
//! on `TensorView { data, layout }`) and arbitrary options, then calls `forward`, `forward_into`,
//! `backward`, `backward_into` and `kvcache_forward`. Properties checked:
//!
//! * nothing panics (any `Ok` or `Err` is fine) and nothing reads out of bounds;
//! * every error is `InvalidArgument` naming a known argument, or `CacheOverflow`;
//! * a call that fails writes nothing (outputs of `forward_into` / `backward_into`, the KV cache);
//! * the owned and the view entry points agree (same error, or bit-identical outputs);
//! * for finite inputs and options an `Ok` output has no NaN, and a query row that sees no key has
//!   `o = 0` and `lse = -inf` (a row that sees a key has a finite `lse`). Visibility is recomputed here
//!   from the spec's formula (`i + sk - sq - left <= j <= i + sk - sq + right`, `j < sk`).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use flashattn::{
    backward, backward_into, forward, forward_into, kvcache_forward, AttnOptions, BackwardInputs, CacheSeqlens, CpuSlice,
    CpuStorage, DType, Error, GradientsMut, KvCache, Layout, Rotary, Tensor, TensorView, TensorViewMut, VarLen,
};
use libfuzzer_sys::fuzz_target;

/// Tensors with a valid element count above this are skipped (they would be legitimately huge problems).
const MAX_NUMEL: usize = 1 << 18;

// ---------------------------------------------------------------------------------------------------------
// Input description.

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Dt {
    F16,
    Bf16,
    F32,
    I32,
}

impl Dt {
    fn get(self) -> DType {
        match self {
            Dt::F16 => DType::F16,
            Dt::Bf16 => DType::BF16,
            Dt::F32 => DType::F32,
            Dt::I32 => DType::I32,
        }
    }
}

/// How a tensor's elements sit in its buffer.
#[derive(Arbitrary, Debug, Clone)]
enum Lay {
    Contiguous,
    /// Padding on each outer stride and a leading offset (in bounds).
    Padded {
        pad: [u8; 4],
        offset: u8,
    },
    /// The two dims before the last swapped in memory (e.g. `[b, h, s, d]` memory seen as `[b, s, h, d]`).
    Permuted {
        pad: u8,
    },
    /// Stride 0 on the outer dims in `mask` (broadcast: overlapping, fine for inputs, not for outputs).
    Broadcast {
        mask: u8,
    },
    /// Last dim not contiguous.
    StridedLast {
        step: u8,
    },
    /// Contiguous strides over a buffer that is too short.
    Short {
        short: u8,
    },
    /// Offset past the start (escapes the buffer unless empty).
    Offset {
        extra: u32,
    },
    /// Arbitrary strides (any count) and offset.
    Raw {
        strides: Vec<u64>,
        offset: u64,
    },
    /// Two dims set to huge extents (the element count overflows usize), or one huge and one zero.
    Huge {
        dims: [u8; 2],
        vals: [u64; 2],
        zero_stride: bool,
    },
}

#[derive(Arbitrary, Debug, Clone)]
enum DimVal {
    Small(u8),
    Big(u64),
}

impl DimVal {
    fn get(&self) -> usize {
        match self {
            DimVal::Small(x) => (*x % 10) as usize,
            // Past i32 and u32: refused, or a zero-size tensor (or an overflowing element count).
            DimVal::Big(x) => (*x | (1 << 32)) as usize,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum ShapeTweak {
    Set(u8, DimVal),
    Drop(u8),
    Push(u8),
    Any(Vec<DimVal>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Vals {
    Normal,
    Zero,
    Big,
    NonFinite(u8),
}

impl Vals {
    /// 0: small values, 1: large but finite, 2: non-finite.
    fn tier(self) -> u8 {
        match self {
            Vals::Normal | Vals::Zero => 0,
            Vals::Big => 1,
            Vals::NonFinite(_) => 2,
        }
    }
}

/// A tensor's description. Mostly (5 times in 8, and always once the input runs out) a clean one, so that
/// calls with several tensors reach the deep checks; otherwise anything.
#[derive(Debug, Clone)]
struct TSpec {
    lay: Lay,
    shape: Option<ShapeTweak>,
    dt: Option<Dt>,
    vals: Vals,
}

#[derive(Arbitrary)]
struct AnyTSpec {
    lay: Lay,
    shape: Option<ShapeTweak>,
    dt: Option<Dt>,
    vals: Vals,
}

impl<'a> Arbitrary<'a> for TSpec {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        if u.ratio(5u8, 8u8)? {
            return Ok(TSpec { lay: Lay::Contiguous, shape: None, dt: None, vals: Vals::Normal });
        }
        let AnyTSpec { lay, shape, dt, vals } = AnyTSpec::arbitrary(u)?;
        Ok(TSpec { lay, shape, dt, vals })
    }
}

impl TSpec {
    /// Whether this is a well-formed output: right shape and dtype, non-overlapping, in bounds.
    fn clean_output(&self) -> bool {
        self.shape.is_none()
            && self.dt.is_none()
            && matches!(self.lay, Lay::Contiguous | Lay::Padded { .. } | Lay::Permuted { .. })
    }
    fn clean_contiguous(&self) -> bool {
        self.shape.is_none() && self.dt.is_none() && matches!(self.lay, Lay::Contiguous)
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum DSel {
    Small(u8),
    Any(u16),
}

#[derive(Arbitrary, Debug, Clone)]
struct Dims {
    b: u8,
    sq: u8,
    sk: u8,
    hk: u8,
    group: u8,
    d: DSel,
}

#[derive(Arbitrary, Debug, Clone)]
enum Win {
    Unbounded,
    Small(i8, i8),
    Raw(i64, i64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Scale {
    Default,
    Small(i8),
    Special(u8),
}

#[derive(Arbitrary, Debug, Clone)]
enum Cap {
    Off,
    Small(u8),
    Special(u8),
}

#[derive(Arbitrary, Debug, Clone)]
enum AlShape {
    H,
    BH,
    Any(Vec<u8>),
    Huge(Vec<u64>),
}

#[derive(Arbitrary, Debug, Clone)]
struct AlibiSpec {
    shape: AlShape,
    dt: Option<Dt>,
    vals: Vals,
}

#[derive(Arbitrary, Debug, Clone)]
struct Opts {
    causal: bool,
    window: Win,
    scale: Scale,
    softcap: Cap,
    alibi: Option<AlibiSpec>,
    deterministic: bool,
    /// A learnable sink, drawn like the slopes (shape, dtype, values).
    sink: Option<AlibiSpec>,
}

#[derive(Arbitrary, Debug, Clone)]
enum VarlenSpec {
    /// Consistent arrays from per-sequence lengths, with an optional poke `(array, index, value)`.
    Lens { q: Vec<u8>, k: Vec<u8>, used: Option<Vec<u8>>, poke: Option<(u8, u8, i32)> },
    /// Arbitrary arrays.
    Raw { cu_q: Vec<i32>, cu_k: Vec<i32>, used: Option<Vec<i32>>, tq: u8, tk: u8 },
}

#[derive(Arbitrary, Debug, Clone)]
enum Src {
    FromForward,
    Given(TSpec),
}

#[derive(Arbitrary, Debug, Clone)]
enum Small {
    Small(u8),
    Raw(i32),
}

#[derive(Arbitrary, Debug, Clone)]
enum List {
    /// `b` small values.
    Exact(u8),
    Raw(Vec<i32>),
}

#[derive(Arbitrary, Debug, Clone)]
enum Entries {
    Iota,
    Random(u8),
    Raw(Vec<i32>),
}

#[derive(Arbitrary, Debug, Clone)]
struct BtSpec {
    shape: Option<ShapeTweak>,
    max_pages: DimVal,
    dt: Option<Dt>,
    entries: Entries,
}

/// Rows of the rotary tables: enough for the positions the keys use (plus `x % 3`), or any.
#[derive(Arbitrary, Debug, Clone)]
enum RotRows {
    Fit(u8),
    Any(u8),
}

/// `rot / 2`: in `1..=d/2`, or any.
#[derive(Arbitrary, Debug, Clone)]
enum Half {
    Fit(u8),
    Any(u8),
}

#[derive(Arbitrary, Debug, Clone)]
struct RotSpec {
    half: Half,
    s_ro: RotRows,
    interleaved: bool,
    cos: TSpec,
    sin: TSpec,
}

#[derive(Arbitrary, Debug, Clone)]
enum Seqlens {
    All(Small),
    PerSeq(List),
}

#[derive(Arbitrary, Debug, Clone)]
enum Call {
    Forward {
        opts: Opts,
        varlen: Option<VarlenSpec>,
        q: TSpec,
        k: TSpec,
        v: TSpec,
        o: TSpec,
        lse: TSpec,
    },
    Backward {
        opts: Opts,
        varlen: Option<VarlenSpec>,
        q: TSpec,
        k: TSpec,
        v: TSpec,
        dout: TSpec,
        o: Src,
        lse: Src,
        dq: TSpec,
        dk: TSpec,
        dv: TSpec,
    },
    KvCache {
        opts: Opts,
        cache_rows: CacheDim,
        cache_len: CacheDim,
        s_new: u8,
        seqlens: Seqlens,
        q: TSpec,
        kc: TSpec,
        vc: TSpec,
        new: Option<(TSpec, TSpec)>,
        block_table: Option<BtSpec>,
        rotary: Option<RotSpec>,
        batch_idx: Option<List>,
        leftpad: Option<List>,
        varlen: Rare<VarlenSpec>,
    },
}

/// A KV-cache dimension: enough for the call (batch rows; positions used) plus `x % 3`, or any.
#[derive(Arbitrary, Debug, Clone)]
enum CacheDim {
    Fit(u8),
    Any(DimVal),
}

/// An option that is rarely `Some` (1 in 8): for what always fails (varlen with a KV cache).
#[derive(Debug, Clone)]
struct Rare<T>(Option<T>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Rare<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Rare(if u.ratio(1u8, 8u8)? { Some(T::arbitrary(u)?) } else { None }))
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct Input {
    dtype: Dt,
    dims: Dims,
    seed: u64,
    call: Call,
}

// ---------------------------------------------------------------------------------------------------------
// Building tensors.

#[path = "shared/rng.rs"]
mod rng;
use rng::Rng;

/// A tensor: its storage and its (possibly invalid) layout.
struct Built {
    st: CpuStorage,
    lay: Layout,
    tier: u8,
}

impl Built {
    fn view(&self) -> TensorView<'_> {
        TensorView { data: self.st.as_slice(), layout: self.lay.clone() }
    }
    fn view_mut(&mut self) -> TensorViewMut<'_> {
        TensorViewMut { data: self.st.as_slice_mut(), layout: self.lay.clone() }
    }
    fn owned(&self) -> Option<Tensor> {
        Tensor::from_storage_strided(self.st.clone(), self.lay.clone()).ok()
    }
    fn from_tensor(t: &Tensor) -> Built {
        Built { st: t.storage().clone(), lay: t.layout().clone(), tier: 0 }
    }
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n))
}

/// Row-major strides, saturating like `Layout::contiguous` (so that a "contiguous" view is the library's
/// contiguous layout even when the element count overflows, e.g. an empty batch with huge other dims).
fn contig_strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![0; shape.len()];
    let mut s = 1usize;
    for (x, &n) in st.iter_mut().zip(shape).rev() {
        *x = s;
        s = s.saturating_mul(n);
    }
    st
}

fn extent(shape: &[usize], strides: &[usize], offset: usize) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = offset;
    for (&n, &s) in shape.iter().zip(strides) {
        last = last.checked_add((n - 1).checked_mul(s)?)?;
    }
    last.checked_add(1)
}

fn apply_tweak(shape: &mut Vec<usize>, t: &Option<ShapeTweak>) {
    let n = shape.len();
    match t {
        None => {}
        Some(ShapeTweak::Set(i, v)) if n > 0 => shape[*i as usize % n] = v.get(),
        Some(ShapeTweak::Drop(i)) if n > 0 => {
            shape.remove(*i as usize % n);
        }
        Some(ShapeTweak::Set(..) | ShapeTweak::Drop(_)) => {}
        Some(ShapeTweak::Push(x)) => shape.push((*x % 10) as usize),
        Some(ShapeTweak::Any(v)) => *shape = v.iter().take(6).map(|x| x.get()).collect(),
    }
}

fn fill(dtype: DType, len: usize, vals: Vals, rng: &mut Rng) -> CpuStorage {
    let mut v: Vec<f32> = (0..len)
        .map(|_| match vals {
            Vals::Zero => 0.0,
            Vals::Normal | Vals::NonFinite(_) => ((rng.next() >> 33) % 65) as f32 / 8.0 - 4.0,
            Vals::Big => ((rng.next() >> 33) % 120_001) as f32 - 60_000.0,
        })
        .collect();
    if let Vals::NonFinite(k) = vals {
        if len > 0 {
            v[k as usize % len] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][k as usize % 3];
        }
    }
    CpuStorage::from_f32(dtype, &v)
}

/// Builds a tensor from its spec; `None` when it would be a legitimately huge tensor (skip the input).
fn build(spec: &TSpec, base: &[usize], base_dt: DType, rng: &mut Rng) -> Option<Built> {
    let mut shape = base.to_vec();
    apply_tweak(&mut shape, &spec.shape);
    let dtype = spec.dt.map(Dt::get).unwrap_or(base_dt);
    let r = shape.len();
    let contig = contig_strides(&shape);
    let numel = checked_numel(&shape);
    let plain_len = numel.filter(|&n| n <= MAX_NUMEL).unwrap_or(16);
    let fit = |strides: &[usize], offset: usize| match extent(&shape, strides, offset) {
        Some(e) if e <= 4 * MAX_NUMEL => e,
        _ => 16,
    };
    let (strides, offset, len) = match &spec.lay {
        Lay::Contiguous => (contig, 0, plain_len),
        Lay::Padded { pad, offset } => {
            let mut st = vec![0usize; r];
            let mut s = 1usize;
            for i in (0..r).rev() {
                st[i] = s;
                s = s.wrapping_mul(shape[i]).wrapping_add(if i > 0 { (pad[(i - 1) % 4] % 4) as usize } else { 0 });
            }
            let off = (*offset % 16) as usize;
            let len = fit(&st, off);
            (st, off, len)
        }
        Lay::Permuted { pad } => {
            let mut order: Vec<usize> = (0..r).collect(); // outermost .. innermost
            if r >= 3 {
                order.swap(r - 3, r - 2);
            }
            let mut st = vec![0usize; r];
            let mut s = 1usize;
            for &i in order.iter().rev() {
                st[i] = s;
                s = s.wrapping_mul(shape[i]).wrapping_add((*pad % 3) as usize);
            }
            let len = fit(&st, 0);
            (st, 0, len)
        }
        Lay::Broadcast { mask } => {
            let mut st = contig;
            for (i, s) in st.iter_mut().enumerate().take(r.saturating_sub(1)) {
                if mask & (1 << i) != 0 {
                    *s = 0;
                }
            }
            (st, 0, plain_len)
        }
        Lay::StridedLast { step } => {
            let mut st = vec![0usize; r];
            let mut s = 2 + (*step % 3) as usize;
            for i in (0..r).rev() {
                st[i] = s;
                s = s.wrapping_mul(shape[i]);
            }
            let len = fit(&st, 0);
            (st, 0, len)
        }
        Lay::Short { short } => (contig, 0, plain_len.saturating_sub(1 + (*short % 8) as usize)),
        Lay::Offset { extra } => (contig, 1 + *extra as usize, plain_len),
        Lay::Raw { strides, offset } => {
            (strides.iter().take(6).map(|&s| s as usize).collect(), *offset as usize, plain_len)
        }
        Lay::Huge { dims, vals, zero_stride } => {
            if r > 0 {
                let (i, j) = (dims[0] as usize % r, dims[1] as usize % r);
                let big = |v: u64| (v | (1 << 32)) as usize;
                shape[i] = big(vals[0]);
                if i != j {
                    shape[j] = big(vals[1]);
                } else {
                    shape[(i + 1) % r] = 0;
                }
            }
            let mut st = contig_strides(&shape);
            if *zero_stride {
                for (k, s) in st.iter_mut().enumerate() {
                    if shape[k] > MAX_NUMEL {
                        *s = 0;
                    }
                }
            }
            (st, 0, 16)
        }
    };
    if let Some(n) = checked_numel(&shape) {
        if n > MAX_NUMEL {
            return None; // a valid but huge tensor: not what this target is about
        }
    }
    let st = fill(dtype, len, spec.vals, rng);
    Some(Built { st, lay: Layout { shape, strides, offset }, tier: spec.vals.tier() })
}

// ---------------------------------------------------------------------------------------------------------
// Options.

struct BuiltOpts {
    opts: AttnOptions,
    /// Scale, softcap and slopes are moderate (finite outputs expected for finite inputs).
    moderate: bool,
}

fn build_opts(o: &Opts, b: usize, h: usize, rng: &mut Rng) -> BuiltOpts {
    let mut opts = AttnOptions { causal: o.causal, deterministic: o.deterministic, ..Default::default() };
    let mut moderate = true;
    opts.window = match o.window {
        Win::Unbounded => (-1, -1),
        Win::Small(l, r) => ((l % 12) as i64, (r % 12) as i64),
        Win::Raw(l, r) => (l, r),
    };
    opts.softmax_scale = match o.scale {
        Scale::Default => None,
        Scale::Small(x) => Some(x as f32 / 8.0),
        Scale::Special(k) => {
            moderate = false;
            let s = [
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                -0.0,
                1e30,
                -1e30,
                f32::MIN_POSITIVE,
                1e-45,
                f32::MAX,
            ];
            Some(s[k as usize % s.len()])
        }
    };
    opts.softcap = match o.softcap {
        Cap::Off => 0.0,
        Cap::Small(x) => x as f32 / 4.0,
        Cap::Special(k) => {
            moderate = false;
            let s = [f32::NAN, f32::INFINITY, -1.0, -0.0, 1e-45, 1e30, f32::MAX, f32::NEG_INFINITY, -f32::NAN];
            s[k as usize % s.len()]
        }
    };
    if let Some(a) = &o.alibi {
        let (t, m) = spec_tensor(a, b, h, rng);
        moderate &= m;
        opts.alibi_slopes = t;
    }
    if let Some(a) = &o.sink {
        let (t, m) = spec_tensor(a, b, h, rng);
        moderate &= m;
        opts.sink = t;
    }
    BuiltOpts { opts, moderate }
}

/// A per-head (or per-batch-and-head) vector as a spec draws it; whether its values are moderate.
fn spec_tensor(a: &AlibiSpec, b: usize, h: usize, rng: &mut Rng) -> (Option<Tensor>, bool) {
    let mut moderate = true;
    {
        let dtype = a.dt.map(Dt::get).unwrap_or(DType::F32);
        let (shape, len): (Vec<usize>, Option<usize>) = match &a.shape {
            AlShape::H => (vec![h], None),
            AlShape::BH => (vec![b, h], None),
            AlShape::Any(v) => (v.iter().take(4).map(|&x| (x % 10) as usize).collect(), None),
            // Storage stays empty: only the shape arithmetic is exercised.
            AlShape::Huge(v) => (v.iter().take(4).map(|&x| x as usize).collect(), Some(0)),
        };
        let len = len.unwrap_or_else(|| checked_numel(&shape).unwrap_or(0).min(MAX_NUMEL));
        if a.vals.tier() > 1 {
            moderate = false;
        }
        let st = fill(dtype, len, a.vals, rng);
        let t = Tensor::from_storage(st, &shape);
        if let Some(x) = &t.as_ref().ok() {
            assert_eq!(x.shape(), shape.as_slice());
        }
        (t.ok(), moderate)
    }
}

/// `(cu_seqlens_q, cu_seqlens_k, seqused_k, total_q, total_k)`.
fn build_varlen(s: &VarlenSpec) -> (VarLen, usize, usize) {
    match s {
        VarlenSpec::Lens { q, k, used, poke } => {
            let b = q.len().min(9);
            let lq: Vec<i32> = q.iter().take(b).map(|&x| (x % 10) as i32).collect();
            let lk: Vec<i32> = (0..b).map(|i| k.get(i).map(|&x| (x % 10) as i32).unwrap_or(3)).collect();
            let cu = |l: &[i32]| {
                let mut c = vec![0i32];
                for &x in l {
                    c.push(c.last().unwrap() + x);
                }
                c
            };
            let (mut cq, mut ck) = (cu(&lq), cu(&lk));
            let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
            let mut used = used
                .as_ref()
                .map(|u| (0..b).map(|i| (u.get(i).copied().unwrap_or(0) as i32) % (lk[i] + 2)).collect::<Vec<_>>());
            if let Some((which, idx, val)) = poke {
                let arr = match which % 3 {
                    0 => Some(&mut cq),
                    1 => Some(&mut ck),
                    _ => used.as_mut(),
                };
                if let Some(arr) = arr {
                    let i = *idx as usize % (arr.len() + 1);
                    if i == arr.len() {
                        arr.push(*val);
                    } else {
                        arr[i] = *val;
                    }
                }
            }
            (VarLen { cu_seqlens_q: cq, cu_seqlens_k: ck, seqused_k: used }, tq, tk)
        }
        VarlenSpec::Raw { cu_q, cu_k, used, tq, tk } => {
            let total = |c: &[i32], t: u8| match c.last() {
                Some(&l) if (0..=81).contains(&l) => l as usize,
                _ => (t % 10) as usize,
            };
            let (tq, tk) = (total(cu_q, *tq), total(cu_k, *tk));
            (VarLen { cu_seqlens_q: cu_q.clone(), cu_seqlens_k: cu_k.clone(), seqused_k: used.clone() }, tq, tk)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Checks.

const ARGS: &[&str] = &[
    "q",
    "k",
    "v",
    "o",
    "lse",
    "dout",
    "dq",
    "dk",
    "dv",
    "window",
    "softmax_scale",
    "softcap",
    "alibi_slopes",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "seqused_k",
    "varlen",
    "k_cache",
    "v_cache",
    "k_new",
    "v_new",
    "cache_seqlens",
    "cache_batch_idx",
    "cache_leftpad",
    "block_table",
    "rotary_cos",
    "rotary_sin",
    "storage",
    "values",
    "sink",
];

fn check_err(e: &Error) {
    match e {
        Error::InvalidArgument { arg, expected, got } => {
            assert!(ARGS.contains(arg), "unknown argument name in {e}");
            assert!(!expected.is_empty() && !got.is_empty(), "empty message: {e:?}");
        }
        Error::CacheOverflow { needed, capacity, .. } => assert!(needed > capacity, "{e:?}"),
        other => panic!("unexpected error kind on the cpu path: {other:?}"),
    }
}

fn bits(s: &CpuStorage) -> Vec<u32> {
    match s.as_slice() {
        CpuSlice::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        CpuSlice::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        CpuSlice::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        CpuSlice::I32(v) => v.iter().map(|&x| x as u32).collect(),
        CpuSlice::E4M3(v) => v.iter().map(|x| x.0 as u32).collect(),
    }
}

fn same_values(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// Whether query `i` of a sequence with `sq` queries and `sk` keys sees any key, from the spec's formula.
fn sees_a_key(i: usize, sq: usize, sk: usize, causal: bool, window: (i64, i64)) -> bool {
    if sk == 0 {
        return false;
    }
    let diag = i as i128 + sk as i128 - sq as i128;
    let lo = if window.0 == -1 { 0 } else { (diag - window.0 as i128).max(0) };
    let right = if causal { 0 } else { window.1 };
    let hi = if right == -1 { sk as i128 - 1 } else { (diag + right as i128).min(sk as i128 - 1) };
    lo <= hi
}

/// One sequence of a batch, for the output checks: query rows `q0..q0 + sq` of o, and `sk` keys.
struct Seq {
    q0: usize,
    sq: usize,
    sk: usize,
}

/// Checks `o` (contiguous, `[.., h, d]` rows in order) and `lse` (contiguous, `[b, h, sq]` or `[h, total_q]`).
fn check_outputs(o: &Tensor, lse: &Tensor, seqs: &[Seq], varlen: bool, opts: &AttnOptions, finite: bool) {
    let (h, d) = (o.shape()[o.shape().len() - 2], o.shape()[o.shape().len() - 1]);
    let ov = o.to_f32_vec();
    let lv = lse.to_f32_vec();
    let total_q: usize = if varlen { lse.shape()[1] } else { 0 };
    if finite {
        assert!(ov.iter().all(|x| !x.is_nan()), "NaN in o for finite inputs");
        assert!(lv.iter().all(|x| !x.is_nan()), "NaN in lse for finite inputs");
    }
    for (s, seq) in seqs.iter().enumerate() {
        for hh in 0..h {
            for i in 0..seq.sq {
                let row = seq.q0 + i;
                let orow = &ov[(row * h + hh) * d..(row * h + hh + 1) * d];
                let l = if varlen { lv[hh * total_q + row] } else { lv[(s * h + hh) * seq.sq + i] };
                if sees_a_key(i, seq.sq, seq.sk, opts.causal, opts.window) {
                    if finite {
                        assert!(l.is_finite(), "row {i} of seq {s} head {hh} sees a key but lse = {l}");
                    }
                } else {
                    // No key: lse = -inf, or the sink's logit with one.
                    let empty = opts.sink.as_ref().map_or(f32::NEG_INFINITY, |z| z.to_f32_vec()[hh]);
                    assert_eq!(l, empty, "row {i} of seq {s} head {hh} sees no key: lse must be {empty}");
                    assert!(orow.iter().all(|&x| x == 0.0), "row {i} of seq {s} head {hh} sees no key: o must be 0");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The calls.

fn head_dim(d: &DSel) -> usize {
    match d {
        DSel::Small(x) => 1 + (*x % 16) as usize,
        DSel::Any(x) => (*x % 301) as usize,
    }
}

/// Shapes of q, k, v, o, lse for a dense or varlen problem.
struct Shapes {
    q: Vec<usize>,
    k: Vec<usize>,
}

/// The shapes of `o` and `lse` the library expects for a q of shape `q` (when q is well-formed).
/// `o`'s and `lse`'s shapes for this q and v: o is q's shape with v's head dim (`d_v`, when v has q's rank).
fn out_shapes(q: &[usize], v: &[usize], varlen: bool) -> (Vec<usize>, Vec<usize>) {
    let (mut o, lse) = match (varlen, q) {
        (true, &[tq, h, _]) => (q.to_vec(), vec![h, tq]),
        // A batch of 0 keeps q's sequence length (`Problem::dense_sq`): `[0, sq, h, d]` and `[0, h, sq]`.
        (false, &[b, sq, h, d]) => (vec![b, sq, h, d], vec![b, h, sq]),
        _ => (q.to_vec(), q.iter().take(3).copied().collect()),
    };
    if let (Some(last), Some(&dv)) = (o.last_mut(), v.last()) {
        if v.len() == q.len() {
            *last = dv;
        }
    }
    (o, lse)
}

fn shapes(dims: &Dims, varlen: Option<&(VarLen, usize, usize)>) -> (Shapes, usize) {
    let hk = 1 + (dims.hk % 3) as usize;
    let h = hk * (1 + (dims.group % 3) as usize);
    let d = head_dim(&dims.d);
    let s = match varlen {
        Some((_, tq, tk)) => Shapes { q: vec![*tq, h, d], k: vec![*tk, hk, d] },
        None => {
            let (b, sq, sk) = ((dims.b % 10) as usize, (dims.sq % 10) as usize, (dims.sk % 10) as usize);
            Shapes { q: vec![b, sq, h, d], k: vec![b, sk, hk, d] }
        }
    };
    (s, h)
}

/// The sequences of a validated (Ok) dense or varlen call.
fn seqs_of(q: &[usize], k: &[usize], vl: Option<&VarLen>) -> Vec<Seq> {
    match vl {
        None => (0..q[0]).map(|i| Seq { q0: i * q[1], sq: q[1], sk: k[1] }).collect(),
        Some(vl) => (0..vl.cu_seqlens_q.len() - 1)
            .map(|i| {
                let sk = (vl.cu_seqlens_k[i + 1] - vl.cu_seqlens_k[i]) as usize;
                Seq {
                    q0: vl.cu_seqlens_q[i] as usize,
                    sq: (vl.cu_seqlens_q[i + 1] - vl.cu_seqlens_q[i]) as usize,
                    sk: vl.seqused_k.as_ref().map(|u| u[i] as usize).unwrap_or(sk),
                }
            })
            .collect(),
    }
}

fn run_forward(inp: &Input, opts: &Opts, varlen: &Option<VarlenSpec>, specs: [&TSpec; 5], rng: &mut Rng) -> Option<()> {
    let base_dt = inp.dtype.get();
    let vl = varlen.as_ref().map(build_varlen);
    let (sh, h) = shapes(&inp.dims, vl.as_ref());
    let batch = match &vl {
        Some((v, _, _)) => v.cu_seqlens_q.len().saturating_sub(1),
        None => sh.q[0],
    };
    let mut bo = build_opts(opts, batch, h, rng);
    bo.opts.varlen = vl.as_ref().map(|v| v.0.clone());
    let q = build(specs[0], &sh.q, base_dt, rng)?;
    let k = build(specs[1], &sh.k, base_dt, rng)?;
    let v = build(specs[2], &sh.k, base_dt, rng)?;
    // Outputs default to what this q calls for, so that "clean" outputs are the right ones.
    let (o_shape, lse_shape) = out_shapes(&q.lay.shape, &v.lay.shape, vl.is_some());
    let mut o = build(specs[3], &o_shape, q.st.dtype(), rng)?;
    let mut lse = build(specs[4], &lse_shape, DType::F32, rng)?;
    let finite = bo.moderate && q.tier.max(k.tier).max(v.tier) <= 1;

    let owned = (q.owned(), k.owned(), v.owned());
    let (o_before, lse_before) = (bits(&o.st), bits(&lse.st));
    let into = forward_into(&q.view(), &k.view(), &v.view(), &mut o.view_mut(), &mut lse.view_mut(), &bo.opts);
    if let Err(e) = &into {
        check_err(e);
        assert!(bits(&o.st) == o_before && bits(&lse.st) == lse_before, "forward_into wrote before failing: {e}");
    }
    let (Some(qt), Some(kt), Some(vt)) = owned else {
        assert!(into.is_err(), "forward_into accepted a view that Tensor::from_storage_strided refuses");
        return Some(());
    };
    let res = forward(&qt, &kt, &vt, &bo.opts);
    let clean = specs[3].clean_output() && specs[4].clean_contiguous();
    match &res {
        Err(e) => {
            check_err(e);
            if clean {
                assert_eq!(into.as_ref().err(), Some(e), "forward and forward_into disagree");
            }
        }
        Ok(out) => {
            if clean {
                assert!(into.is_ok(), "forward accepted but forward_into refused clean outputs: {into:?}");
            }
            if into.is_ok() {
                assert!(same_values(&out.o.to_f32_vec(), &o.view().to_f32_vec()), "forward vs forward_into: o");
                assert!(same_values(&out.lse.to_f32_vec(), &lse.view().to_f32_vec()), "forward vs forward_into: lse");
            }
            let seqs = seqs_of(qt.shape(), kt.shape(), bo.opts.varlen.as_ref());
            check_outputs(&out.o, &out.lse, &seqs, vl.is_some(), &bo.opts, finite);
        }
    }
    Some(())
}

#[allow(clippy::too_many_arguments)]
fn run_backward(
    inp: &Input,
    opts: &Opts,
    varlen: &Option<VarlenSpec>,
    qkv: [&TSpec; 3],
    dout: &TSpec,
    o_src: &Src,
    lse_src: &Src,
    grads: [&TSpec; 3],
    rng: &mut Rng,
) -> Option<()> {
    let base_dt = inp.dtype.get();
    let vl = varlen.as_ref().map(build_varlen);
    let (sh, h) = shapes(&inp.dims, vl.as_ref());
    let batch = match &vl {
        Some((v, _, _)) => v.cu_seqlens_q.len().saturating_sub(1),
        None => sh.q[0],
    };
    let mut bo = build_opts(opts, batch, h, rng);
    bo.opts.varlen = vl.as_ref().map(|v| v.0.clone());
    let q = build(qkv[0], &sh.q, base_dt, rng)?;
    let k = build(qkv[1], &sh.k, base_dt, rng)?;
    let v = build(qkv[2], &sh.k, base_dt, rng)?;
    let (o_shape, lse_shape) = out_shapes(&q.lay.shape, &v.lay.shape, vl.is_some());
    let qdt = q.st.dtype();
    let g = build(dout, &o_shape, qdt, rng)?;
    let fwd = match (q.owned(), k.owned(), v.owned()) {
        (Some(qt), Some(kt), Some(vt)) => forward(&qt, &kt, &vt, &bo.opts).ok(),
        _ => None,
    };
    let mut from_forward = fwd.is_some();
    let o = match (o_src, &fwd) {
        (Src::FromForward, Some(f)) => Built::from_tensor(&f.o),
        (Src::Given(s), _) => {
            from_forward = false;
            build(s, &o_shape, qdt, rng)?
        }
        (Src::FromForward, None) => build(dout, &o_shape, qdt, rng)?,
    };
    let lse = match (lse_src, &fwd) {
        (Src::FromForward, Some(f)) => Built::from_tensor(&f.lse),
        (Src::Given(s), _) => {
            from_forward = false;
            build(s, &lse_shape, DType::F32, rng)?
        }
        (Src::FromForward, None) => build(dout, &lse_shape, DType::F32, rng)?,
    };
    let finite = from_forward && bo.moderate && q.tier.max(k.tier).max(v.tier).max(g.tier) <= 1;
    let mut dq = build(grads[0], &q.lay.shape, qdt, rng)?;
    let mut dk = build(grads[1], &k.lay.shape, k.st.dtype(), rng)?;
    let mut dv = build(grads[2], &v.lay.shape, v.st.dtype(), rng)?;
    let before = [bits(&dq.st), bits(&dk.st), bits(&dv.st)];
    let x = BackwardInputs { q: q.view(), k: k.view(), v: v.view(), o: o.view(), lse: lse.view(), dout: g.view() };
    let into = backward_into(&x, GradientsMut { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() }, &bo.opts);
    if let Err(e) = &into {
        check_err(e);
        assert!(before == [bits(&dq.st), bits(&dk.st), bits(&dv.st)], "backward_into wrote before failing: {e}");
    }
    let (Some(qt), Some(kt), Some(vt), Some(ot), Some(lt), Some(gt)) =
        (q.owned(), k.owned(), v.owned(), o.owned(), lse.owned(), g.owned())
    else {
        return Some(());
    };
    let res = backward(&BackwardInputs { q: &qt, k: &kt, v: &vt, o: &ot, lse: &lt, dout: &gt }, &bo.opts);
    // `backward` allocates gradients shaped like q, k, v: comparable when the given ones are well-formed.
    let clean = grads.iter().all(|s| s.clean_output());
    match &res {
        Err(e) => {
            check_err(e);
            if clean {
                assert_eq!(into.as_ref().err(), Some(e), "backward and backward_into disagree");
            }
        }
        Ok(gr) => {
            if clean {
                assert!(into.is_ok(), "backward accepted but backward_into refused clean gradients: {into:?}");
            }
            if into.is_ok() {
                assert!(same_values(&gr.dq.to_f32_vec(), &dq.view().to_f32_vec()), "backward vs backward_into: dq");
                assert!(same_values(&gr.dk.to_f32_vec(), &dk.view().to_f32_vec()), "backward vs backward_into: dk");
                assert!(same_values(&gr.dv.to_f32_vec(), &dv.view().to_f32_vec()), "backward vs backward_into: dv");
            }
            if finite {
                for (n, t) in [("dq", &gr.dq), ("dk", &gr.dk), ("dv", &gr.dv)] {
                    assert!(t.to_f32_vec().iter().all(|x| !x.is_nan()), "NaN in {n} for finite inputs");
                }
            }
        }
    }
    Some(())
}

fn small_i32(s: &Small, modulo: i32) -> i32 {
    match s {
        Small::Small(x) => (*x as i32) % modulo,
        Small::Raw(x) => *x,
    }
}

fn list(l: &List, b: usize, modulo: i32, rng: &mut Rng) -> Vec<i32> {
    match l {
        List::Exact(k) => {
            (0..b).map(|_| ((rng.next() >> 33) as i32).rem_euclid(modulo) - (*k % 4 == 3) as i32).collect()
        }
        List::Raw(v) => v.iter().take(16).copied().collect(),
    }
}

fn run_kvcache(inp: &Input, c: &Call, rng: &mut Rng) -> Option<()> {
    let Call::KvCache {
        opts,
        cache_rows,
        cache_len,
        s_new,
        seqlens,
        q: qs,
        kc: kcs,
        vc: vcs,
        new,
        block_table,
        rotary,
        batch_idx,
        leftpad,
        varlen,
    } = c
    else {
        unreachable!()
    };
    let base_dt = inp.dtype.get();
    let dims = &inp.dims;
    let hk = 1 + (dims.hk % 3) as usize;
    let h = hk * (1 + (dims.group % 3) as usize);
    let d = head_dim(&dims.d);
    let (b, sq) = ((dims.b % 10) as usize, (dims.sq % 10) as usize);
    let s_new = (*s_new % 10) as usize;
    let cache_seqlens = match seqlens {
        Seqlens::All(s) => CacheSeqlens::All(small_i32(s, 12)),
        Seqlens::PerSeq(l) => CacheSeqlens::PerSeq(list(l, b, 12, rng)),
    };
    let need = match &cache_seqlens {
        CacheSeqlens::All(n) => *n as i64,
        CacheSeqlens::PerSeq(v) => v.iter().map(|&n| n as i64).max().unwrap_or(0),
    } + s_new as i64;
    let rows = match cache_rows {
        CacheDim::Fit(x) => b + (x % 3) as usize,
        CacheDim::Any(v) => v.get(),
    };
    let len = match cache_len {
        CacheDim::Fit(x) => need.clamp(0, 30) as usize + (x % 3) as usize,
        CacheDim::Any(v) => v.get(),
    };
    let mut bo = build_opts(opts, b, h, rng);
    bo.opts.varlen = varlen.0.as_ref().map(|v| build_varlen(v).0);
    let q = build(qs, &[b, sq, h, d], base_dt, rng)?;
    let mut kc = build(kcs, &[rows, len, hk, d], base_dt, rng)?;
    let mut vc = build(vcs, &[rows, len, hk, d], base_dt, rng)?;
    let new = match new {
        Some((ks, vs)) => {
            Some((build(ks, &[b, s_new, hk, d], base_dt, rng)?, build(vs, &[b, s_new, hk, d], base_dt, rng)?))
        }
        None => None,
    };
    let bt = match block_table {
        None => None,
        Some(spec) => {
            let mut shape = vec![b, spec.max_pages.get()];
            apply_tweak(&mut shape, &spec.shape);
            let n = match checked_numel(&shape) {
                Some(n) if n <= MAX_NUMEL => n,
                Some(_) => return None,
                None => 0,
            };
            let vals: Vec<i32> = match &spec.entries {
                Entries::Iota => (0..n).map(|i| (i % rows.clamp(1, 1 << 20)) as i32).collect(),
                Entries::Random(k) => (0..n)
                    .map(|_| ((rng.next() >> 33) % (rows.min(1 << 20) as u64 + 2)) as i32 - (*k % 2) as i32)
                    .collect(),
                Entries::Raw(v) => v.iter().copied().cycle().take(n).collect(),
            };
            let st = match spec.dt.map(Dt::get) {
                None | Some(DType::I32) => CpuStorage::I32(vals),
                Some(dt) => CpuStorage::from_f32(dt, &vals.iter().map(|&x| x as f32).collect::<Vec<_>>()),
            };
            match Tensor::from_storage(st, &shape) {
                Ok(t) => Some(t),
                Err(e) => {
                    check_err(&e);
                    return Some(());
                }
            }
        }
    };
    let rot = match rotary {
        None => None,
        Some(r) => {
            let s_ro = match r.s_ro {
                RotRows::Fit(x) => need.clamp(0, 40) as usize + (x % 3) as usize,
                RotRows::Any(x) => (x % 20) as usize,
            };
            let half = match r.half {
                Half::Fit(x) => 1 + (x as usize) % (d / 2).max(1),
                Half::Any(x) => (x % 8) as usize,
            };
            let shape = [s_ro, half];
            Some((build(&r.cos, &shape, DType::F32, rng)?, build(&r.sin, &shape, DType::F32, rng)?, r.interleaved))
        }
    };
    let batch_idx = batch_idx.as_ref().map(|l| list(l, b, rows.clamp(1, 1 << 20) as i32 + 1, rng));
    let leftpad = leftpad.as_ref().map(|l| list(l, b, 6, rng));

    let mut tier = q.tier.max(kc.tier).max(vc.tier);
    if let Some((kn, vn)) = &new {
        tier = tier.max(kn.tier).max(vn.tier);
    }
    if let Some((cos, sin, _)) = &rot {
        // Rotation multiplies values: large ones may overflow f16 (inf in the cache), which is not a bug.
        tier = tier.max(cos.tier.max(sin.tier)).max(if tier > 0 { 2 } else { 0 });
    }
    let finite = bo.moderate && tier <= 1;

    let before = (bits(&kc.st), bits(&vc.st));
    let res = {
        let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), cache_seqlens.clone());
        if let Some((kn, vn)) = &new {
            cache.k_new = Some(kn.view());
            cache.v_new = Some(vn.view());
        }
        cache.block_table = bt.clone();
        if let Some((cos, sin, inter)) = &rot {
            cache.rotary = Some(Rotary { cos: cos.view(), sin: sin.view(), interleaved: *inter });
        }
        cache.cache_batch_idx = batch_idx.clone();
        cache.cache_leftpad = leftpad.clone();
        kvcache_forward(&q.view(), &mut cache, &bo.opts)
    };
    match res {
        Err(e) => {
            check_err(&e);
            assert!(before == (bits(&kc.st), bits(&vc.st)), "kvcache_forward wrote the cache before failing: {e}");
        }
        Ok(out) => {
            assert_eq!(out.o.shape(), out_shapes(&q.lay.shape, &vc.lay.shape, false).0.as_slice());
            let (b, sq) = (q.lay.shape[0], q.lay.shape[1]);
            let s_new = new.as_ref().map(|(kn, _)| kn.lay.shape[1]).unwrap_or(0);
            let seqs: Vec<Seq> = (0..b)
                .map(|i| {
                    let n = match &cache_seqlens {
                        CacheSeqlens::All(n) => *n as usize,
                        CacheSeqlens::PerSeq(v) => v[i] as usize,
                    };
                    let lp = leftpad.as_ref().map(|l| l[i] as usize).unwrap_or(0);
                    Seq { q0: i * sq, sq, sk: n + s_new - lp }
                })
                .collect();
            check_outputs(&out.o, &out.lse, &seqs, false, &bo.opts, finite);
        }
    }
    Some(())
}

fn run(inp: &Input) {
    let mut rng = Rng(inp.seed);
    match &inp.call {
        Call::Forward { opts, varlen, q, k, v, o, lse } => {
            let _ = run_forward(inp, opts, varlen, [q, k, v, o, lse], &mut rng);
        }
        Call::Backward { opts, varlen, q, k, v, dout, o, lse, dq, dk, dv } => {
            let _ = run_backward(inp, opts, varlen, [q, k, v], dout, o, lse, [dq, dk, dv], &mut rng);
        }
        c @ Call::KvCache { .. } => {
            let _ = run_kvcache(inp, c, &mut rng);
        }
    }
}

fuzz_target!(|inp: Input| {
    run(&inp);
});
