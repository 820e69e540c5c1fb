//! The textbook algorithm, materialising every score: `softmax(scale * Q Kᵀ) V`.
//!
//! One generic implementation serves two purposes:
//! - [`forward_f64`]/[`backward_f64`]: the `f64` oracle every test compares against;
//! - [`naive_forward`]/[`naive_backward`]: the *same-precision baseline* of the spec (scores in `f32`,
//!   probabilities rounded to the input dtype before `P·V`), which is also the "naive formula" that
//!   `flashattn check` and `flashattn bench` set against the flash path. It materialises each head's
//!   `[sq, sk]` score matrix (O(seqlen²) memory), as the formula does.

use crate::dtype::DType;
use crate::problem::Problem;
use crate::semantics::{alibi_bias, kv_head};
use crate::tensor::{CpuSlice, Tensor};
use rayon::prelude::*;

/// The float type of a materialised computation (`f32` or `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// -inf.
    const NEG_INF: Self;
    /// From `f32`.
    fn of(x: f32) -> Self;
    /// To `f64`.
    fn f64(self) -> f64;
    /// `e^x`.
    fn exp(self) -> Self;
    /// `ln x`.
    fn ln(self) -> Self;
    /// `tanh x`.
    fn tanh(self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            fn of(x: f32) -> Self {
                x as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Forward results in contiguous logical layouts: `o` like q (`[total_q, h, d]` in row order, which is
/// also `[b, sq, h, d]` when dense) and `lse` in [`Problem::lse_shape`].
#[derive(Debug, Clone)]
pub struct Forward<T> {
    /// Output.
    pub o: Vec<T>,
    /// Log-sum-exp of each row's scores (`-inf` for a row with no visible key).
    pub lse: Vec<T>,
}

/// Gradients in contiguous logical layouts (`dq` like q, `dk`/`dv` like k).
#[derive(Debug, Clone)]
pub struct Grads<T> {
    /// dL/dq.
    pub dq: Vec<T>,
    /// dL/dk.
    pub dk: Vec<T>,
    /// dL/dv.
    pub dv: Vec<T>,
}

/// How intermediate values are rounded: not at all (the oracle) or to the input dtype (the baseline).
#[derive(Clone, Copy)]
struct Rounding(Option<DType>);

impl Rounding {
    #[inline]
    fn r<T: Real>(self, x: T) -> T {
        match self.0 {
            Some(dt) => T::of(dt.round(x.f64() as f32)),
            None => x,
        }
    }
}

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
    p: &Problem,
    data: CpuSlice<'_>,
    map: &crate::problem::RowMap,
    seq: usize,
    head: usize,
    rows: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(rows * p.d);
    let mut buf = vec![0f32; p.d];
    for r in 0..rows {
        data.read_f32(map.at(seq, r, head), &mut buf);
        out.extend(buf.iter().map(|&x| T::of(x)));
    }
    out
}

fn heads<T: Real>(p: &Problem, q: CpuSlice<'_>, k: CpuSlice<'_>, v: CpuSlice<'_>, seq: usize, head: usize) -> Head<T> {
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let kh = kv_head(head, p.h, p.hk);
    Head {
        seq,
        head,
        sq,
        sk,
        q: gather(p, q, &p.q, seq, head, sq),
        k: gather(p, k, &p.k, seq, kh, sk),
        v: gather(p, v, &p.v, seq, kh, sk),
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

impl Rounding {
    /// Scores are `f32` in the baseline.
    #[inline]
    fn r_f32<T: Real>(self, x: T) -> T {
        match self.0 {
            Some(_) => T::of(x.f64() as f32),
            None => x,
        }
    }
}

/// Row softmax in place; returns each row's lse (`-inf` for an empty row, whose probabilities are 0).
fn softmax_rows<T: Real>(s: &mut [T], sq: usize, sk: usize) -> Vec<T> {
    let mut lse = vec![T::NEG_INF; sq];
    for i in 0..sq {
        let row = &mut s[i * sk..(i + 1) * sk];
        let m = row.iter().copied().fold(T::NEG_INF, |a, b| if b > a { b } else { a });
        if m == T::NEG_INF {
            row.iter_mut().for_each(|x| *x = T::ZERO);
            continue;
        }
        let mut l = T::ZERO;
        for x in row.iter_mut() {
            *x = if *x == T::NEG_INF { T::ZERO } else { (*x - m).exp() };
            l += *x;
        }
        for x in row.iter_mut() {
            *x = *x / l;
        }
        lse[i] = m + l.ln();
    }
    lse
}

fn all_heads(p: &Problem) -> Vec<(usize, usize)> {
    (0..p.batch).flat_map(|s| (0..p.h).map(move |h| (s, h))).collect()
}

fn forward_generic<T: Real>(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    round: Rounding,
) -> Forward<T> {
    let d = p.d;
    let per_head: Vec<(usize, usize, Vec<T>, Vec<T>)> = all_heads(p)
        .into_par_iter()
        .map(|(seq, head)| {
            let hd = heads::<T>(p, q, k, v, seq, head);
            let (mut s, _) = scores(p, &hd, round);
            let lse = softmax_rows(&mut s, hd.sq, hd.sk);
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

fn backward_generic<T: Real>(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: CpuSlice<'_>,
    do_map: &crate::problem::RowMap,
    round: Rounding,
) -> Grads<T> {
    let d = p.d;
    let group = p.h / p.hk;
    let tasks: Vec<(usize, usize)> = (0..p.batch).flat_map(|s| (0..p.hk).map(move |kh| (s, kh))).collect();
    let results: Vec<_> = tasks
        .into_par_iter()
        .map(|(seq, kh)| {
            let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
            let mut dk = vec![T::ZERO; sk * d];
            let mut dv = vec![T::ZERO; sk * d];
            let mut dqs = Vec::new();
            for head in kh * group..(kh + 1) * group {
                let hd = heads::<T>(p, q, k, v, seq, head);
                let dout_h = gather::<T>(p, dout, do_map, seq, head, sq);
                let (mut s, th) = scores(p, &hd, round);
                softmax_rows(&mut s, sq, sk);
                let mut dq = vec![T::ZERO; sq * d];
                let scale = T::of(p.scale);
                for i in 0..sq {
                    let range = p.mask.key_range(i, sq, sk);
                    // dP_ij = dO_i · v_j ; D_i = sum_j P_ij dP_ij
                    let mut dp = vec![T::ZERO; range.len()];
                    let mut di = T::ZERO;
                    for (jj, j) in range.clone().enumerate() {
                        let mut acc = T::ZERO;
                        for c in 0..d {
                            acc += dout_h[i * d + c] * hd.v[j * d + c];
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
                        for c in 0..d {
                            dv[j * d + c] += pr * dout_h[i * d + c];
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
    let mut g = Grads {
        dq: vec![T::ZERO; p.total_q * p.h * d],
        dk: vec![T::ZERO; p.total_k * p.hk * d],
        dv: vec![T::ZERO; p.total_k * p.hk * d],
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
                g.dv[dst + c] = round.r(dv[t * d + c]);
            }
        }
    }
    g
}

/// The `f64` oracle: forward pass from the (already rounded) inputs, exact arithmetic.
pub fn forward_f64(p: &Problem, q: CpuSlice<'_>, k: CpuSlice<'_>, v: CpuSlice<'_>) -> Forward<f64> {
    forward_generic(p, q, k, v, Rounding(None))
}

/// The `f64` oracle's gradients for upstream gradient `dout` (laid out by `do_map`).
pub fn backward_f64(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: CpuSlice<'_>,
    do_map: &crate::problem::RowMap,
) -> Grads<f64> {
    backward_generic(p, q, k, v, dout, do_map, Rounding(None))
}

/// The naive formula in the input precision (the spec's same-precision baseline): `f32` scores, `P`
/// rounded to the input dtype before `P·V`, output rounded to the dtype.
pub fn naive_forward(p: &Problem, q: CpuSlice<'_>, k: CpuSlice<'_>, v: CpuSlice<'_>) -> (Tensor, Tensor) {
    let f = forward_generic::<f32>(p, q, k, v, Rounding(Some(p.dtype)));
    (
        Tensor::from_f32(&f.o, &p.o_shape(), p.dtype).expect("shape"),
        Tensor::from_f32(&f.lse, &p.lse_shape(), DType::F32).expect("shape"),
    )
}

/// The naive backward in the input precision: `P` and `dS` rounded to the dtype, gradients rounded to
/// the dtype. Returns `f32` vectors in contiguous logical layouts.
pub fn naive_backward(
    p: &Problem,
    q: CpuSlice<'_>,
    k: CpuSlice<'_>,
    v: CpuSlice<'_>,
    dout: CpuSlice<'_>,
    do_map: &crate::problem::RowMap,
) -> Grads<f32> {
    backward_generic(p, q, k, v, dout, do_map, Rounding(Some(p.dtype)))
}
