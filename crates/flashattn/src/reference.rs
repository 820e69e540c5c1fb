//! The textbook algorithm, materialising every score: `softmax(scale * Q Kᵀ) V`.
//!
//! One generic implementation serves two purposes:
//! - [`forward_f64`]/[`backward_f64`]: the `f64` oracle every test compares against;
//! - [`naive_forward`]/[`naive_backward`]: the *same-precision baseline* of the spec (scores in `f32`,
//!   probabilities rounded to the input dtype before `P·V`), which is also the "naive formula" that
//!   `flashattn check` and `flashattn bench` set against the flash path. It materialises each head's
//!   `[sq, sk]` score matrix (O(seqlen²) memory), as the formula does.
//!
//! [`oracle_f64`] and [`naive_f32`] compute the forward pass and the gradients in one go, sharing the scores.
//! Each `(sequence, query head)` is one parallel task; its matrix products run through one cache-blocked,
//! register-tiled kernel (compiled twice, plain and for AVX2+FMA, picked at run time). Blocking only changes
//! the order of the sums inside each product; the baseline's roundings to the dtype sit exactly where the
//! textbook loops put them (the loops are kept as `plain`, test-only, and the tests compare the two).

use crate::dtype::DType;
use crate::gemm::{gemm, round_up, transpose_into, ARef, R};
use crate::problem::{Problem, RowMap};
use crate::semantics::{alibi_bias, kv_head};
use crate::tensor::{CpuSlice, Tensor};
use rayon::prelude::*;
use std::ops::Range;

pub use crate::gemm::Real;

/// Forward results in contiguous logical layouts: `o` like q with the value head dim (`[total_q, h, d_v]` in
/// row order, which is also `[b, sq, h, d_v]` when dense) and `lse` in [`Problem::lse_shape`].
#[derive(Debug, Clone)]
pub struct Forward<T> {
    /// Output.
    pub o: Vec<T>,
    /// Log-sum-exp of each row's scores (`-inf` for a row with no visible key).
    pub lse: Vec<T>,
}

/// Gradients in contiguous logical layouts (`dq` like q, `dk` like k, `dv` like v).
#[derive(Debug, Clone)]
pub struct Grads<T> {
    /// dL/dq.
    pub dq: Vec<T>,
    /// dL/dk.
    pub dk: Vec<T>,
    /// dL/dv.
    pub dv: Vec<T>,
    /// dL/dsink per query head (empty without a sink).
    pub dsink: Vec<T>,
}

/// How intermediate values are rounded: not at all (the oracle) or to the input dtype (the baseline).
#[derive(Clone, Copy)]
struct Rounding(Option<DType>);

impl Rounding {
    /// To the input dtype (baseline) or not at all (oracle).
    #[inline]
    fn r<T: Real>(self, x: T) -> T {
        match self.0 {
            Some(dt) => T::of(dt.round(x.f64() as f32)),
            None => x,
        }
    }
    /// Scores are `f32` in the baseline.
    #[inline]
    fn r_f32<T: Real>(self, x: T) -> T {
        match self.0 {
            Some(_) => T::of(x.f64() as f32),
            None => x,
        }
    }
}

/// The union of `range(x)` over `x` in `lo..hi` (ranges are contiguous; empty ones are ignored).
fn union(lo: usize, hi: usize, range: impl Fn(usize) -> Range<usize>) -> Range<usize> {
    let (mut a, mut b) = (usize::MAX, 0);
    for x in lo..hi {
        let r = range(x);
        if !r.is_empty() {
            a = a.min(r.start);
            b = b.max(r.end);
        }
    }
    if a < b {
        a..b
    } else {
        0..0
    }
}

/// `r` widened to multiples of `w` (the columns a register tile covers).
fn aligned(r: Range<usize>, w: usize) -> Range<usize> {
    if r.is_empty() {
        0..0
    } else {
        (r.start / w * w)..round_up(r.end, w)
    }
}

/// `rows` rows of `data` at `map`, converted to `T` and multiplied by `mul` (an FP8 descale, else 1; in `T`:
/// exact in `f64`), into a zero-padded `[rows_pad, ld]` matrix.
#[allow(clippy::too_many_arguments)]
fn gather_pad<T: Real>(
    data: CpuSlice<'_>,
    map: &RowMap,
    seq: usize,
    head: usize,
    rows: usize,
    rows_pad: usize,
    d: usize,
    ld: usize,
    mul: f32,
) -> Vec<T> {
    let mut out = vec![T::ZERO; rows_pad * ld];
    let mut buf = vec![0f32; d];
    let m = T::of(mul);
    for r in 0..rows {
        data.read_f32(map.at(seq, r, head), &mut buf);
        for (o, &x) in out[r * ld..r * ld + d].iter_mut().zip(&buf) {
            *o = if mul == 1.0 { T::of(x) } else { T::of(x) * m };
        }
    }
    out
}

/// The transpose of the first `d` columns of `x` (`rows` rows, leading dimension `ld`): `[d, ld_t]`.
fn transpose<T: Real>(x: &[T], rows: usize, ld: usize, d: usize, ld_t: usize) -> Vec<T> {
    let mut t = vec![T::ZERO; d * ld_t];
    transpose_into(x, rows, ld, d, &mut t, ld_t);
    t
}

/// Row softmax in place over the first `sk` entries of each of `sq` rows (leading dimension `ld`); returns
/// each row's lse. A row whose `visible` key range is empty gets probabilities 0 and lse `-inf` (the sink
/// with one). Otherwise non-finite scores propagate as in the naive formula: a NaN score, a `+inf` score, or
/// (without a sink) visible scores that are all `-inf` make every probability of the row and its lse NaN.
/// A `sink` logit joins each row's denominator and takes no probability of its own. Hidden entries hold
/// `-inf`.
fn softmax_rows<T: Real>(
    s: &mut [T],
    sq: usize,
    sk: usize,
    ld: usize,
    visible: impl Fn(usize) -> Range<usize>,
    sink: Option<T>,
) -> Vec<T> {
    let mut lse = vec![sink.unwrap_or(T::NEG_INF); sq];
    for (i, l_out) in lse.iter_mut().enumerate() {
        let row = &mut s[i * ld..i * ld + sk];
        if visible(i).is_empty() {
            row.iter_mut().for_each(|x| *x = T::ZERO);
            continue;
        }
        let mut m = sink.unwrap_or(T::NEG_INF);
        let mut nan = false;
        for &x in row.iter() {
            #[allow(clippy::eq_op)]
            let is_nan = x != x;
            nan |= is_nan;
            if x > m {
                m = x;
            }
        }
        if nan || m == T::NEG_INF {
            m = T::of(f32::NAN);
        }
        let mut l = sink.map_or(T::ZERO, |z| (z - m).exp());
        for x in row.iter_mut() {
            *x = if *x == T::NEG_INF { T::ZERO } else { (*x - m).exp() };
            l += *x;
        }
        for x in row.iter_mut() {
            *x = *x / l;
        }
        *l_out = m + l.ln();
    }
    lse
}

/// The FP8 baseline's probabilities, over what [`softmax_rows`] left in `p` (rows with no visible key, or a
/// non-finite maximum, keep its result): `p_ij = exp(s_ij - m_i)` in `T` (`f32`), `l_i` their sum (plus the
/// sink's `exp(sink - m_i)`), then `P_ij = round_e4m3(p_ij) / l_i` for the `P·V` product, as an FP8 kernel
/// that feeds e4m3 probabilities to its tensor cores and divides by the `f32` row sum at the end computes.
/// `m_i` is the largest visible score (or the sink).
fn fp8_probabilities<T: Real>(
    p: &mut [T],
    scores: &[T],
    sq: usize,
    sk: usize,
    ld: usize,
    visible: impl Fn(usize) -> Range<usize>,
    sink: Option<T>,
) {
    for i in 0..sq {
        let range = visible(i);
        if range.is_empty() {
            continue;
        }
        let row = &scores[i * ld..i * ld + sk];
        let mut m = sink.unwrap_or(T::NEG_INF);
        for j in range.clone() {
            if row[j] > m {
                m = row[j];
            }
        }
        if !m.f64().is_finite() || row[range.clone()].iter().any(|x| x.f64().is_nan()) {
            continue;
        }
        let mut l = sink.map_or(T::ZERO, |z| (z - m).exp());
        let e: Vec<T> =
            row[range.clone()].iter().map(|&x| if x == T::NEG_INF { T::ZERO } else { (x - m).exp() }).collect();
        for &x in &e {
            l += x;
        }
        let out = &mut p[i * ld..i * ld + sk];
        out.iter_mut().for_each(|x| *x = T::ZERO);
        for (j, &x) in range.zip(&e) {
            out[j] = T::of(DType::E4M3.round(x.f64() as f32)) / l;
        }
    }
}

/// The inputs of a computation.
#[derive(Clone, Copy)]
struct Args<'a> {
    p: &'a Problem,
    q: CpuSlice<'a>,
    k: CpuSlice<'a>,
    v: CpuSlice<'a>,
    /// The upstream gradient and its layout, when gradients are wanted.
    dout: Option<(CpuSlice<'a>, &'a RowMap)>,
    /// Whether `o` is wanted.
    want_o: bool,
    round: Rounding,
    /// The FP8 baseline: probabilities by [`fp8_probabilities`] (`round` is then the output dtype's).
    fp8: bool,
}

/// What one `(sequence, query head)` task produces, in padded row-major matrices.
struct HeadOut<T> {
    seq: usize,
    head: usize,
    /// `[sq, dvp]` (empty unless `o` is wanted).
    o: Vec<T>,
    lse: Vec<T>,
    /// `[sq, dp]`, `[sk, dp]`, `[sk, dvp]` (empty unless gradients are wanted); `dk`, `dv` are this query
    /// head's share of its key head's gradients.
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    /// This task's share of dL/dsink of its head: `-sum_i exp(sink - lse_i) D_i`.
    dsink: T,
}

/// Leading dimension of the `d`-wide (or `d_v`-wide) matrices.
fn padded_d<const W: usize>(d: usize) -> usize {
    round_up(d, W)
}

/// One `(sequence, query head)`: scores, softmax, `o` and (when asked) this head's gradients.
#[inline(always)]
fn head_task<T: Real, const F: bool, const W: usize>(x: Args<'_>, seq: usize, head: usize) -> HeadOut<T> {
    let p = x.p;
    let (sq, sk, d, d_v) = (p.seqlen_q[seq], p.seqlen_k[seq], p.d, p.d_v);
    let round = x.round;
    let kh = kv_head(head, p.h, p.hk);
    let (sqp, skp, dp, dvp) = (round_up(sq, R), round_up(sk, W), padded_d::<W>(d), padded_d::<W>(d_v));
    // W is a multiple of R, so the key rows of the transposed products (padded to R) fit in `skp`.
    let skr = round_up(sk, R);
    let q: Vec<T> = gather_pad(x.q, &p.q, seq, head, sq, sqp, d, dp, p.q_scale(seq, head));
    let k: Vec<T> = gather_pad(x.k, &p.k, seq, kh, sk, sk, d, dp, p.k_scale(seq, kh));
    let v: Vec<T> = gather_pad(x.v, &p.v, seq, kh, sk, sk, d_v, dvp, p.v_scale(seq, kh));
    let kt = transpose(&k, sk, dp, d, skp);
    let mask = p.mask;
    let keys = |i0: usize, i1: usize| union(i0, i1.min(sq), |i| mask.key_range(i, sq, sk));
    let key_cols = |i0: usize, i1: usize| aligned(keys(i0, i1), W);
    let queries = |j0: usize, j1: usize| union(j0, j1.min(sk), |j| mask.query_range(j, sq, sk));

    // S = Q Kᵀ over the visible blocks, then scale, soft-capping, ALiBi and the mask per element.
    let mut s = vec![T::ZERO; sqp * skp];
    gemm::<T, F, W>(ARef { a: &q, rs: dp, cs: 1 }, &kt, skp, &mut s, skp, sqp, |i0, i1| (0..d, key_cols(i0, i1)));
    let scale = T::of(p.scale);
    let cap = T::of(p.softcap);
    let slope = p.alibi.as_ref().map(|a| a.slope(seq, head, p.h));
    let keep_th = p.softcap > 0.0 && x.dout.is_some();
    let mut th = if keep_th { vec![T::ZERO; sq * sk] } else { Vec::new() };
    for i in 0..sq {
        let range = mask.key_range(i, sq, sk);
        let row = &mut s[i * skp..i * skp + sk];
        for (j, sij) in row.iter_mut().enumerate() {
            if !range.contains(&j) {
                *sij = T::NEG_INF;
                continue;
            }
            let mut y = round.r_f32(*sij * scale);
            if p.softcap > 0.0 {
                let t = (y / cap).tanh();
                if keep_th {
                    th[i * sk + j] = t;
                }
                y = cap * t;
            }
            if let Some(sl) = slope {
                y += T::of(alibi_bias(sl, i, j, sq, sk));
            }
            *sij = y;
        }
    }
    let sink = p.sink.as_ref().map(|z| T::of(z[head]));
    let scores = if x.fp8 { s.clone() } else { Vec::new() };
    let lse = softmax_rows(&mut s, sq, sk, skp, |i| mask.key_range(i, sq, sk), sink);
    // From here on `s` holds P as the products use it: rounded to the dtype in the baseline (hidden
    // entries and padding are 0). The FP8 baseline rounds the unnormalised `exp(s - rowmax)` to e4m3 instead.
    if x.fp8 {
        fp8_probabilities(&mut s, &scores, sq, sk, skp, |i| mask.key_range(i, sq, sk), sink);
    } else if round.0.is_some() {
        for i in 0..sq {
            for pij in &mut s[i * skp..i * skp + sk] {
                *pij = round.r(*pij);
            }
        }
    }
    let mut o = Vec::new();
    if x.want_o {
        o = vec![T::ZERO; sqp * dvp];
        gemm::<T, F, W>(ARef { a: &s, rs: skp, cs: 1 }, &v, dvp, &mut o, dvp, sqp, |i0, i1| (keys(i0, i1), 0..dvp));
        o.truncate(sq * dvp);
        if v.iter().any(|x| !x.f64().is_finite()) {
            // The blocked product also multiplies hidden keys' zero weights by their values; with a
            // non-finite value that would be NaN, so the rows are summed exactly over their non-zero weights.
            for i in 0..sq {
                let orow = &mut o[i * dvp..(i + 1) * dvp];
                orow.iter_mut().for_each(|y| *y = T::ZERO);
                for j in mask.key_range(i, sq, sk) {
                    let pij = s[i * skp + j];
                    if pij != T::ZERO {
                        for c in 0..d_v {
                            orow[c] += pij * v[j * dvp + c];
                        }
                    }
                }
            }
        }
        o.iter_mut().for_each(|y| *y = round.r(*y));
    }
    let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
    let mut dsink = T::ZERO;
    if let Some((dout, do_map)) = x.dout {
        let dout: Vec<T> = gather_pad(dout, do_map, seq, head, sq, sqp, d_v, dvp, 1.0);
        let vt = transpose(&v, sk, dvp, d_v, skp);
        // dP = dO Vᵀ.
        let mut dpm = vec![T::ZERO; sqp * skp];
        gemm::<T, F, W>(ARef { a: &dout, rs: dvp, cs: 1 }, &vt, skp, &mut dpm, skp, sqp, |i0, i1| {
            (0..d_v, key_cols(i0, i1))
        });
        // dS = P ∘ (dP - D), D_i = sum_j P_ij dP_ij, in place of dP; the baseline rounds dP and dS to the
        // dtype, as a framework would store them (and the soft-capping factor's product too).
        for i in 0..sq {
            let range = mask.key_range(i, sq, sk);
            let (prow, grow) = (&s[i * skp..(i + 1) * skp], &mut dpm[i * skp..(i + 1) * skp]);
            let mut di = T::ZERO;
            for j in range.clone() {
                let g = round.r(grow[j]);
                grow[j] = g;
                di += prow[j] * g;
            }
            // The sink's probability is exp(sink - lse_i); its score's gradient is that times (0 - D_i).
            if let Some(z) = sink {
                dsink = dsink - (z - lse[i]).exp() * di;
            }
            for j in 0..skp {
                if !range.contains(&j) || prow[j] == T::ZERO {
                    grow[j] = T::ZERO;
                    continue;
                }
                let mut g = round.r(prow[j] * (grow[j] - di));
                if p.softcap > 0.0 {
                    let t = th[i * sk + j];
                    g = round.r(g * (T::ONE - t * t));
                }
                grow[j] = g * scale;
            }
        }
        dpm[sq * skp..].iter_mut().for_each(|g| *g = T::ZERO);
        let ds = dpm;
        // dQ = dS K; dK = dSᵀ Q; dV = Pᵀ dO (with dSᵀ and Pᵀ transposed once, so every product reads rows).
        dq = vec![T::ZERO; sqp * dp];
        gemm::<T, F, W>(ARef { a: &ds, rs: skp, cs: 1 }, &k, dp, &mut dq, dp, sqp, |i0, i1| (keys(i0, i1), 0..dp));
        dq.truncate(sq * dp);
        let dst = transpose(&ds, sqp, skp, skr, sqp);
        drop(ds);
        dk = vec![T::ZERO; skr * dp];
        gemm::<T, F, W>(ARef { a: &dst, rs: sqp, cs: 1 }, &q, dp, &mut dk, dp, skr, |j0, j1| (queries(j0, j1), 0..dp));
        dk.truncate(sk * dp);
        drop(dst);
        let pt = transpose(&s, sqp, skp, skr, sqp);
        dv = vec![T::ZERO; skr * dvp];
        gemm::<T, F, W>(ARef { a: &pt, rs: sqp, cs: 1 }, &dout, dvp, &mut dv, dvp, skr, |j0, j1| {
            (queries(j0, j1), 0..dvp)
        });
        dv.truncate(sk * dvp);
    }
    HeadOut { seq, head, o, lse, dq, dk, dv, dsink }
}

/// Whether this x86-64 CPU has AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// [`head_task`] compiled for AVX2+FMA (fused multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_task_avx2<T: Real, const W: usize>(x: Args<'_>, seq: usize, head: usize) -> HeadOut<T> {
    head_task::<T, true, W>(x, seq, head)
}

/// [`head_task`] through the AVX2+FMA copy when the CPU has it.
fn head_dispatch<T: Real, const W: usize>(x: Args<'_>, seq: usize, head: usize) -> HeadOut<T> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { head_task_avx2::<T, W>(x, seq, head) };
    }
    head_task::<T, false, W>(x, seq, head)
}

/// The whole computation: one task per `(sequence, query head)`, in parallel; `dk`/`dv` of a key head sum
/// its query heads' shares in head order. `W` is the register tile's width (two AVX2 vectors of `T`).
fn compute<T: Real, const W: usize>(x: Args<'_>) -> (Forward<T>, Option<Grads<T>>) {
    let p = x.p;
    let (d, d_v) = (p.d, p.d_v);
    let (dp, dvp) = (padded_d::<W>(d), padded_d::<W>(d_v));
    let tasks: Vec<(usize, usize)> = (0..p.batch).flat_map(|s| (0..p.h).map(move |h| (s, h))).collect();
    let results: Vec<HeadOut<T>> =
        tasks.into_par_iter().map(|(seq, head)| head_dispatch::<T, W>(x, seq, head)).collect();
    let round = x.round;
    let mut fwd = Forward {
        o: if x.want_o { vec![T::ZERO; p.total_q * p.h * d_v] } else { Vec::new() },
        lse: vec![T::NEG_INF; p.total_q * p.h],
    };
    for r in &results {
        for (i, &l) in r.lse.iter().enumerate() {
            fwd.lse[p.lse_index(r.seq, r.head, i)] = l;
            if x.want_o {
                let dst = ((p.q_start[r.seq] + i) * p.h + r.head) * d_v;
                fwd.o[dst..dst + d_v].copy_from_slice(&r.o[i * dvp..i * dvp + d_v]);
            }
        }
    }
    if x.dout.is_none() {
        return (fwd, None);
    }
    let mut g = Grads {
        dq: vec![T::ZERO; p.total_q * p.h * d],
        dk: vec![T::ZERO; p.total_k * p.hk * d],
        dv: vec![T::ZERO; p.total_k * p.hk * d_v],
        dsink: if p.sink.is_some() { vec![T::ZERO; p.h] } else { Vec::new() },
    };
    if p.sink.is_some() {
        // Summed over sequences in order (results are in (sequence, head) order).
        for r in &results {
            g.dsink[r.head] += r.dsink;
        }
    }
    let group = p.h / p.hk;
    for r in &results {
        for i in 0..p.seqlen_q[r.seq] {
            let dst = ((p.q_start[r.seq] + i) * p.h + r.head) * d;
            for c in 0..d {
                g.dq[dst + c] = round.r(r.dq[i * dp + c]);
            }
        }
    }
    for seq in 0..p.batch {
        for kh in 0..p.hk {
            let shares: Vec<&HeadOut<T>> =
                results.iter().filter(|r| r.seq == seq && r.head / group == kh).collect::<Vec<_>>();
            for t in 0..p.seqlen_k[seq] {
                let dst = ((p.k_start[seq] + t) * p.hk + kh) * d;
                for c in 0..d {
                    let mut a = T::ZERO;
                    for r in &shares {
                        a += r.dk[t * dp + c];
                    }
                    g.dk[dst + c] = round.r(a);
                }
                let dst = ((p.k_start[seq] + t) * p.hk + kh) * d_v;
                for c in 0..d_v {
                    let mut b = T::ZERO;
                    for r in &shares {
                        b += r.dv[t * dvp + c];
                    }
                    g.dv[dst + c] = round.r(b);
                }
            }
        }
    }
    (fwd, Some(g))
}

/// The `f64` oracle: forward pass from the (already rounded) inputs, exact arithmetic.
pub fn forward_f64(p: &Problem, q: CpuSlice<'_>, k: CpuSlice<'_>, v: CpuSlice<'_>) -> Forward<f64> {
    compute::<f64, 8>(Args { p, q, k, v, dout: None, want_o: true, round: Rounding(None), fp8: false }).0
}

/// The `f64` oracle's gradients for upstream gradient `dout` (laid out by `do_map`).
pub fn backward_f64(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: CpuSlice<'_>,
    do_map: &RowMap,
) -> Grads<f64> {
    let x = Args { p, q, k, v, dout: Some((dout, do_map)), want_o: false, round: Rounding(None), fp8: false };
    compute::<f64, 8>(x).1.expect("gradients were asked for")
}

/// The `f64` oracle's forward pass and, when `dout` is given, its gradients, sharing the scores (what
/// [`forward_f64`] and [`backward_f64`] return, for less work than both).
pub fn oracle_f64(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: Option<(CpuSlice<'_>, &RowMap)>,
) -> (Forward<f64>, Option<Grads<f64>>) {
    compute::<f64, 8>(Args { p, q, k, v, dout, want_o: true, round: Rounding(None), fp8: false })
}

/// The same-precision baseline's forward pass and, when `dout` is given, its gradients, sharing the
/// scores (what [`naive_forward`] and [`naive_backward`] return, as `f32` vectors in logical layouts).
pub fn naive_f32(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: Option<(CpuSlice<'_>, &RowMap)>,
) -> (Forward<f32>, Option<Grads<f32>>) {
    let (round, fp8) = baseline_rounding(p);
    compute::<f32, 16>(Args { p, q, k, v, dout, want_o: true, round, fp8 })
}

/// The baseline's roundings: to the input dtype; with FP8 inputs, the FP8 probabilities
/// ([`fp8_probabilities`]) and the output dtype for the rest.
fn baseline_rounding(p: &Problem) -> (Rounding, bool) {
    if p.is_fp8() {
        (Rounding(Some(p.out_dtype)), true)
    } else {
        (Rounding(Some(p.dtype)), false)
    }
}

/// The naive formula in the input precision (the spec's same-precision baseline): `f32` scores, `P`
/// rounded to the input dtype before `P·V`, output rounded to the dtype. FP8 inputs (dequantized with
/// their descales): `p = exp(s - rowmax)` in `f32`, the row sum from that `p`, `p` rounded to e4m3 for `P·V`,
/// the output rounded to its dtype (bf16 or f16).
pub fn naive_forward(p: &Problem, q: CpuSlice<'_>, k: CpuSlice<'_>, v: CpuSlice<'_>) -> (Tensor, Tensor) {
    let f = naive_f32(p, q, k, v, None).0;
    (
        Tensor::from_f32(&f.o, &p.o_shape(), p.out_dtype).expect("shape"),
        Tensor::from_f32(&f.lse, &p.lse_shape(), DType::F32).expect("shape"),
    )
}

/// The naive backward in the input precision: `P`, `dP` and `dS` rounded to the dtype, gradients rounded
/// to the dtype. Returns `f32` vectors in contiguous logical layouts.
pub fn naive_backward(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: CpuSlice<'_>,
    do_map: &RowMap,
) -> Grads<f32> {
    let (round, fp8) = baseline_rounding(p);
    let x = Args { p, q, k, v, dout: Some((dout, do_map)), want_o: false, round, fp8 };
    compute::<f32, 16>(x).1.expect("gradients were asked for")
}

/// The textbook loops, one element at a time (no blocking), kept to check the blocked code above.
#[cfg(test)]
mod plain {
    use super::*;

    /// One `(sequence, query head)` pair's rows, gathered contiguously.
    struct Head<T> {
        seq: usize,
        head: usize,
        sq: usize,
        sk: usize,
        q: Vec<T>,
        k: Vec<T>,
        v: Vec<T>,
    }

    fn gather<T: Real>(
        data: CpuSlice<'_>,
        map: &crate::problem::RowMap,
        seq: usize,
        head: usize,
        rows: usize,
        width: usize,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(rows * width);
        let mut buf = vec![0f32; width];
        for r in 0..rows {
            data.read_f32(map.at(seq, r, head), &mut buf);
            out.extend(buf.iter().map(|&x| T::of(x)));
        }
        out
    }

    fn heads<T: Real>(
        p: &Problem,
        q: CpuSlice<'_>,
        k: CpuSlice<'_>,
        v: CpuSlice<'_>,
        seq: usize,
        head: usize,
    ) -> Head<T> {
        let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
        let kh = kv_head(head, p.h, p.hk);
        Head {
            seq,
            head,
            sq,
            sk,
            q: gather(q, &p.q, seq, head, sq, p.d),
            k: gather(k, &p.k, seq, kh, sk, p.d),
            v: gather(v, &p.v, seq, kh, sk, p.d_v),
        }
    }

    /// Scores of one head after scale, soft-capping, ALiBi and the mask: `[sq, sk]`, `-inf` where hidden.
    /// Also returns `tanh(x / cap)` per score for the soft-capping derivative (empty when soft-capping is off).
    fn scores<T: Real>(p: &Problem, hd: &Head<T>, round: Rounding) -> (Vec<T>, Vec<T>) {
        let (sq, sk, d) = (hd.sq, hd.sk, p.d);
        let mut s = vec![T::NEG_INF; sq * sk];
        let mut th = if p.softcap > 0.0 { vec![T::ZERO; sq * sk] } else { Vec::new() };
        let scale = T::of(p.scale);
        let cap = T::of(p.softcap);
        let slope = p.alibi.as_ref().map(|a| a.slope(hd.seq, hd.head, p.h));
        for i in 0..sq {
            for j in p.mask.key_range(i, sq, sk) {
                let mut acc = T::ZERO;
                for c in 0..d {
                    acc += hd.q[i * d + c] * hd.k[j * d + c];
                }
                let mut x = round.r_f32(acc * scale);
                if p.softcap > 0.0 {
                    let t = (x / cap).tanh();
                    th[i * sk + j] = t;
                    x = cap * t;
                }
                if let Some(sl) = slope {
                    x += T::of(alibi_bias(sl, i, j, sq, sk));
                }
                s[i * sk + j] = x;
            }
        }
        (s, th)
    }

    fn all_heads(p: &Problem) -> Vec<(usize, usize)> {
        (0..p.batch).flat_map(|s| (0..p.h).map(move |h| (s, h))).collect()
    }

    pub(super) fn forward_generic<T: Real>(
        p: &Problem,
        q: CpuSlice<'_>,
        k: CpuSlice<'_>,
        v: CpuSlice<'_>,
        round: Rounding,
    ) -> Forward<T> {
        let d = p.d_v;
        let per_head: Vec<(usize, usize, Vec<T>, Vec<T>)> = all_heads(p)
            .into_par_iter()
            .map(|(seq, head)| {
                let hd = heads::<T>(p, q, k, v, seq, head);
                let (mut s, _) = scores(p, &hd, round);
                let sink = p.sink.as_ref().map(|z| T::of(z[head]));
                let lse = super::softmax_rows(&mut s, hd.sq, hd.sk, hd.sk, |i| p.mask.key_range(i, hd.sq, hd.sk), sink);
                let mut o = vec![T::ZERO; hd.sq * d];
                for i in 0..hd.sq {
                    for j in 0..hd.sk {
                        let pij = round.r(s[i * hd.sk + j]);
                        if pij == T::ZERO {
                            continue;
                        }
                        for c in 0..d {
                            o[i * d + c] += pij * hd.v[j * d + c];
                        }
                    }
                }
                o.iter_mut().for_each(|x| *x = round.r(*x));
                (seq, head, o, lse)
            })
            .collect();
        let mut out = Forward { o: vec![T::ZERO; p.total_q * p.h * d], lse: vec![T::NEG_INF; p.total_q * p.h] };
        for (seq, head, o, lse) in per_head {
            for (i, l) in lse.into_iter().enumerate() {
                out.lse[p.lse_index(seq, head, i)] = l;
                let dst = ((p.q_start[seq] + i) * p.h + head) * d;
                out.o[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        out
    }

    pub(super) fn backward_generic<T: Real>(
        p: &Problem,
        q: CpuSlice<'_>,
        k: CpuSlice<'_>,
        v: CpuSlice<'_>,
        dout: CpuSlice<'_>,
        do_map: &crate::problem::RowMap,
        round: Rounding,
    ) -> Grads<T> {
        let (d, d_v) = (p.d, p.d_v);
        let group = p.h / p.hk;
        let tasks: Vec<(usize, usize)> = (0..p.batch).flat_map(|s| (0..p.hk).map(move |kh| (s, kh))).collect();
        let results: Vec<_> = tasks
            .into_par_iter()
            .map(|(seq, kh)| {
                let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
                let mut dk = vec![T::ZERO; sk * d];
                let mut dv = vec![T::ZERO; sk * d_v];
                let mut dqs = Vec::new();
                for head in kh * group..(kh + 1) * group {
                    let hd = heads::<T>(p, q, k, v, seq, head);
                    let dout_h = gather::<T>(dout, do_map, seq, head, sq, d_v);
                    let (mut s, th) = scores(p, &hd, round);
                    let sink = p.sink.as_ref().map(|z| T::of(z[head]));
                    super::softmax_rows(&mut s, sq, sk, sk, |i| p.mask.key_range(i, sq, sk), sink);
                    let mut dq = vec![T::ZERO; sq * d];
                    let scale = T::of(p.scale);
                    for i in 0..sq {
                        let range = p.mask.key_range(i, sq, sk);
                        // dP_ij = dO_i · v_j ; D_i = sum_j P_ij dP_ij
                        let mut dp = vec![T::ZERO; range.len()];
                        let mut di = T::ZERO;
                        for (jj, j) in range.clone().enumerate() {
                            let mut acc = T::ZERO;
                            for c in 0..d_v {
                                acc += dout_h[i * d_v + c] * hd.v[j * d_v + c];
                            }
                            // The baseline rounds dP and P to the dtype, as a framework would store them.
                            let acc = round.r(acc);
                            dp[jj] = acc;
                            di += round.r(s[i * sk + j]) * acc;
                        }
                        for (jj, j) in range.enumerate() {
                            let pij = s[i * sk + j];
                            if pij == T::ZERO {
                                continue;
                            }
                            let pr = round.r(pij);
                            for c in 0..d_v {
                                dv[j * d_v + c] += pr * dout_h[i * d_v + c];
                            }
                            let mut ds = round.r(pr * (dp[jj] - di));
                            if p.softcap > 0.0 {
                                let t = th[i * sk + j];
                                ds = round.r(ds * (T::ONE - t * t));
                            }
                            let ds = ds * scale;
                            for c in 0..d {
                                dq[i * d + c] += ds * hd.k[j * d + c];
                                dk[j * d + c] += ds * hd.q[i * d + c];
                            }
                        }
                    }
                    dqs.push((head, dq));
                }
                (seq, kh, dqs, dk, dv)
            })
            .collect();
        // The textbook loops check dq, dk and dv; dsink is checked against finite differences.
        let mut g = Grads {
            dq: vec![T::ZERO; p.total_q * p.h * d],
            dk: vec![T::ZERO; p.total_k * p.hk * d],
            dv: vec![T::ZERO; p.total_k * p.hk * d_v],
            dsink: Vec::new(),
        };
        for (seq, kh, dqs, dk, dv) in results {
            for (head, dq) in dqs {
                for i in 0..p.seqlen_q[seq] {
                    let dst = ((p.q_start[seq] + i) * p.h + head) * d;
                    for c in 0..d {
                        g.dq[dst + c] = round.r(dq[i * d + c]);
                    }
                }
            }
            for t in 0..p.seqlen_k[seq] {
                let dst = ((p.k_start[seq] + t) * p.hk + kh) * d;
                for c in 0..d {
                    g.dk[dst + c] = round.r(dk[t * d + c]);
                }
                let dst = ((p.k_start[seq] + t) * p.hk + kh) * d_v;
                for c in 0..d_v {
                    g.dv[dst + c] = round.r(dv[t * d_v + c]);
                }
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::validate;
    use crate::{AttnOptions, VarLen};
    use rand::{Rng, SeedableRng};

    fn randn(r: &mut rand::rngs::StdRng, shape: &[usize], dtype: DType, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        // Sum of uniforms: roughly normal, never all zero.
        let x: Vec<f32> = (0..n).map(|_| scale * (0..4).map(|_| r.gen::<f32>() - 0.5).sum::<f32>() * 1.7).collect();
        Tensor::from_f32(&x, shape, dtype).unwrap()
    }

    fn cases() -> Vec<(AttnOptions, [usize; 6])> {
        // (b, sq, sk, h, hk, d)
        let slopes = Tensor::from_f32(&[0.1, 0.2, 0.05, 0.3], &[4], DType::F32).unwrap();
        vec![
            (AttnOptions::default(), [2, 5, 7, 4, 2, 8]),
            (AttnOptions::default(), [1, 67, 130, 4, 1, 59]),
            (AttnOptions::default().causal(), [2, 130, 67, 4, 4, 40]),
            (AttnOptions::default().causal(), [1, 3, 150, 4, 2, 33]),
            (AttnOptions::default().window(9, 3), [1, 80, 90, 4, 2, 17]),
            (AttnOptions::default().softcap(2.0), [1, 70, 70, 4, 2, 64]),
            (AttnOptions::default().alibi(slopes).causal(), [2, 65, 66, 4, 2, 24]),
            (
                AttnOptions {
                    varlen: Some(VarLen {
                        cu_seqlens_q: vec![0, 0, 37, 107],
                        cu_seqlens_k: vec![0, 20, 20, 151],
                        seqused_k: Some(vec![13, 0, 100]),
                    }),
                    causal: true,
                    ..Default::default()
                },
                [3, 0, 0, 4, 2, 72],
            ),
        ]
    }

    fn inputs(opts: &AttnOptions, [b, sq, sk, h, hk, d]: [usize; 6], dtype: DType, seed: u64) -> [Tensor; 4] {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let (qs, ks) = match &opts.varlen {
            Some(vl) => {
                let (tq, tk) = (*vl.cu_seqlens_q.last().unwrap() as usize, *vl.cu_seqlens_k.last().unwrap() as usize);
                (vec![tq, h, d], vec![tk, hk, d])
            }
            None => (vec![b, sq, h, d], vec![b, sk, hk, d]),
        };
        let q_scale = if opts.softcap > 0.0 { 4.0 } else { 1.0 };
        [
            randn(&mut r, &qs, dtype, q_scale),
            randn(&mut r, &ks, dtype, 1.0),
            randn(&mut r, &ks, dtype, 1.0),
            randn(&mut r, &qs, dtype, 1.0),
        ]
    }

    fn max_diff<T: Real>(a: &[T], b: &[T]) -> (f64, f64) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f64, |m, y| m.max(y.f64().abs()));
        let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| {
            let (x, y) = (x.f64(), y.f64());
            if x == y {
                m
            } else {
                m.max((x - y).abs())
            }
        });
        (diff, scale)
    }

    /// The blocked oracle equals the element-by-element loops to f64 rounding.
    #[test]
    fn blocked_oracle_matches_plain_loops() {
        for (n, (opts, shape)) in cases().into_iter().enumerate() {
            let [q, k, v, g] = inputs(&opts, shape, DType::F32, n as u64);
            let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
            let (qd, kd, vd, gd) = (q.view().data, k.view().data, v.view().data, g.view().data);
            let map = p.q_like_map(g.layout());
            let (f, gr) = oracle_f64(&p, qd, kd, vd, Some((gd, &map)));
            let gr = gr.unwrap();
            let f0 = plain::forward_generic::<f64>(&p, qd, kd, vd, Rounding(None));
            let g0 = plain::backward_generic::<f64>(&p, qd, kd, vd, gd, &map, Rounding(None));
            for (name, a, b) in
                [("o", &f.o, &f0.o), ("dq", &gr.dq, &g0.dq), ("dk", &gr.dk, &g0.dk), ("dv", &gr.dv, &g0.dv)]
            {
                let (diff, scale) = max_diff(a, b);
                assert!(diff <= 1e-12 * (1.0 + scale), "case {n} {name}: {diff:e} (scale {scale:e})");
            }
            for (a, b) in f.lse.iter().zip(&f0.lse) {
                assert!(a == b || (a - b).abs() <= 1e-12 * (1.0 + b.abs()), "case {n} lse {a} vs {b}");
            }
            // The single-purpose entry points agree with the combined one.
            assert_eq!(forward_f64(&p, qd, kd, vd).o, f.o);
            assert_eq!(backward_f64(&p, qd, kd, vd, gd, &map).dq, gr.dq);
        }
    }

    /// The blocked baseline rounds at the same points as the plain loops: the two differ only by the order
    /// of `f32` sums (a few ulps of the dtype at most), and their errors against the oracle agree.
    #[test]
    fn blocked_baseline_matches_plain_loops() {
        for dtype in [DType::F16, DType::BF16] {
            for (n, (opts, shape)) in cases().into_iter().enumerate() {
                let [q, k, v, g] = inputs(&opts, shape, dtype, 100 + n as u64);
                let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
                let (qd, kd, vd, gd) = (q.view().data, k.view().data, v.view().data, g.view().data);
                let map = p.q_like_map(g.layout());
                let (f, gr) = naive_f32(&p, qd, kd, vd, Some((gd, &map)));
                let gr = gr.unwrap();
                let (fr, grr) = oracle_f64(&p, qd, kd, vd, Some((gd, &map)));
                let grr = grr.unwrap();
                let f0 = plain::forward_generic::<f32>(&p, qd, kd, vd, Rounding(Some(dtype)));
                let g0 = plain::backward_generic::<f32>(&p, qd, kd, vd, gd, &map, Rounding(Some(dtype)));
                let err = |x: &[f32], r: &[f64]| x.iter().zip(r).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
                let eps = if dtype == DType::F16 { 1.0 / 1024.0 } else { 1.0 / 128.0 };
                for (name, a, b, r) in [
                    ("o", &f.o, &f0.o, &fr.o),
                    ("dq", &gr.dq, &g0.dq, &grr.dq),
                    ("dk", &gr.dk, &g0.dk, &grr.dk),
                    ("dv", &gr.dv, &g0.dv, &grr.dv),
                ] {
                    let (diff, scale) = max_diff(a, b);
                    assert!(diff <= 4.0 * eps * scale.max(1e-3), "{dtype} case {n} {name}: {diff:e} (scale {scale:e})");
                    let (ea, eb) = (err(a, r), err(b, r));
                    assert!(
                        ea <= 1.5 * eb + 1e-6 && eb <= 1.5 * ea + 1e-6,
                        "{dtype} case {n} {name}: baseline error {ea:e} vs {eb:e}"
                    );
                }
            }
        }
    }

    /// A value head dim other than `d` (wider and narrower, GQA, causal, varlen): the blocked oracle equals the
    /// element-by-element loops, and the blocked baseline rounds where they do.
    #[test]
    fn value_head_dim_matches_plain_loops() {
        let mut r = rand::rngs::StdRng::seed_from_u64(9);
        let varlen = VarLen { cu_seqlens_q: vec![0, 30, 30, 75], cu_seqlens_k: vec![0, 41, 90, 90], seqused_k: None };
        for (n, (opts, [b, sq, sk, h, hk, d, dv])) in [
            (AttnOptions::default(), [2, 33, 70, 4, 2, 40, 24]),
            (AttnOptions::default().causal(), [1, 70, 67, 4, 1, 17, 72]),
            (AttnOptions { varlen: Some(varlen), causal: true, ..Default::default() }, [3, 0, 0, 4, 2, 24, 9]),
        ]
        .into_iter()
        .enumerate()
        {
            let (qs, ks, vs, os) = match &opts.varlen {
                Some(vl) => {
                    let (tq, tk) = (75, *vl.cu_seqlens_k.last().unwrap() as usize);
                    (vec![tq, h, d], vec![tk, hk, d], vec![tk, hk, dv], vec![tq, h, dv])
                }
                None => (vec![b, sq, h, d], vec![b, sk, hk, d], vec![b, sk, hk, dv], vec![b, sq, h, dv]),
            };
            for dtype in [DType::F32, DType::F16] {
                let (q, k) = (randn(&mut r, &qs, dtype, 1.0), randn(&mut r, &ks, dtype, 1.0));
                let (v, g) = (randn(&mut r, &vs, dtype, 1.0), randn(&mut r, &os, dtype, 1.0));
                let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
                assert_eq!((p.d, p.d_v, p.o_shape()), (d, dv, os.clone()));
                let (qd, kd, vd, gd) = (q.view().data, k.view().data, v.view().data, g.view().data);
                let map = p.q_like_map(g.layout());
                let round = if dtype == DType::F32 { Rounding(None) } else { Rounding(Some(dtype)) };
                let pairs: Vec<(&str, Vec<f64>, Vec<f64>)> = if dtype == DType::F32 {
                    let (f, gr) = oracle_f64(&p, qd, kd, vd, Some((gd, &map)));
                    let gr = gr.unwrap();
                    let f0 = plain::forward_generic::<f64>(&p, qd, kd, vd, round);
                    let g0 = plain::backward_generic::<f64>(&p, qd, kd, vd, gd, &map, round);
                    vec![("o", f.o, f0.o), ("dq", gr.dq, g0.dq), ("dk", gr.dk, g0.dk), ("dv", gr.dv, g0.dv)]
                } else {
                    let (f, gr) = naive_f32(&p, qd, kd, vd, Some((gd, &map)));
                    let gr = gr.unwrap();
                    let f0 = plain::forward_generic::<f32>(&p, qd, kd, vd, round);
                    let g0 = plain::backward_generic::<f32>(&p, qd, kd, vd, gd, &map, round);
                    let w = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<_>>();
                    vec![
                        ("o", w(f.o), w(f0.o)),
                        ("dq", w(gr.dq), w(g0.dq)),
                        ("dk", w(gr.dk), w(g0.dk)),
                        ("dv", w(gr.dv), w(g0.dv)),
                    ]
                };
                let tol = if dtype == DType::F32 { 1e-12 } else { 4.0 / 1024.0 };
                for (name, a, b) in &pairs {
                    let want = [
                        ("o", os.iter().product::<usize>()),
                        ("dq", qs.iter().product()),
                        ("dk", ks.iter().product()),
                        ("dv", vs.iter().product()),
                    ];
                    assert_eq!(a.len(), want.iter().find(|x| x.0 == *name).unwrap().1, "case {n} {name} length");
                    let (diff, scale) = max_diff(a, b);
                    assert!(diff <= tol * (1.0 + scale), "{dtype} case {n} {name}: {diff:e} (scale {scale:e})");
                }
            }
        }
    }

    /// Times the blocked oracle and baseline against the plain loops on one head group (single thread for
    /// a fair core-for-core figure): `cargo test --release --lib -- --ignored bench_blocked --nocapture`.
    #[test]
    #[ignore = "timing tool"]
    fn bench_blocked_vs_plain() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for (dtype, shape) in [(DType::BF16, [1, 512, 512, 2, 2, 128]), (DType::BF16, [1, 1024, 1024, 1, 1, 256])] {
            let opts = AttnOptions::default();
            let [q, k, v, g] = inputs(&opts, shape, dtype, 7);
            let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
            let (qd, kd, vd, gd) = (q.view().data, k.view().data, v.view().data, g.view().data);
            let map = p.q_like_map(g.layout());
            let time = |f: &(dyn Fn() + Sync)| {
                let t0 = std::time::Instant::now();
                pool.install(f);
                t0.elapsed().as_secs_f64()
            };
            let t_plain_o = time(&|| {
                plain::forward_generic::<f64>(&p, qd, kd, vd, Rounding(None));
                plain::backward_generic::<f64>(&p, qd, kd, vd, gd, &map, Rounding(None));
            });
            let t_fast_o = time(&|| {
                oracle_f64(&p, qd, kd, vd, Some((gd, &map)));
            });
            let t_plain_n = time(&|| {
                plain::forward_generic::<f32>(&p, qd, kd, vd, Rounding(Some(dtype)));
                plain::backward_generic::<f32>(&p, qd, kd, vd, gd, &map, Rounding(Some(dtype)));
            });
            let t_fast_n = time(&|| {
                naive_f32(&p, qd, kd, vd, Some((gd, &map)));
            });
            let [b, sq, sk, h, _, d] = shape;
            let mac = (b * h * sq * sk * d) as f64;
            println!(
                "{shape:?}: oracle fwd+bwd plain {t_plain_o:.3}s blocked {t_fast_o:.3}s ({:.1}x, {:.2} ns/MAC); \
                 baseline plain {t_plain_n:.3}s blocked {t_fast_n:.3}s ({:.1}x, {:.2} ns/MAC)",
                t_plain_o / t_fast_o,
                1e9 * t_fast_o / (6.0 * mac),
                t_plain_n / t_fast_n,
                1e9 * t_fast_n / (6.0 * mac)
            );
        }
    }
}
