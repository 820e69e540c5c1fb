//! Tiled FlashAttention on the CPU, forward and backward.
//!
//! Forward: one task per (sequence, query head, tile of `BM` query rows). Each task walks the key tiles its
//! rows can see (block skipping from the mask), keeping a running max `m`, running sum `l` and an `f32`
//! accumulator (online softmax), so the score matrix is never stored: extra memory is O(tile), per thread.
//!
//! Backward: two passes that never race and so are deterministic. Pass 1, one task per (sequence, query head,
//! query tile): recompute `P` from `lse` and `dP = dO Vᵀ`, first to get `D = rowsum(P ∘ dP)`, then to
//! accumulate `dQ += dS K` with `dS = P ∘ (dP - D)`. Pass 2, one task per (sequence, key head, tile of `BN`
//! keys): recompute `P` and `dS`, accumulate `dV += Pᵀ dO` and `dK += dSᵀ Q` over every query head of the
//! group. The forward's `o` is not read: `D` from the recomputed `P` and `dP` is exact where `rowsum(dO ∘ O)`
//! would carry the rounding of `O` to f16/bf16.

use super::tile::{axpy, dot, load_rows, pv_row, ScoreFn};
use crate::problem::{Problem, RowMap};
use crate::semantics::kv_head;
use crate::tensor::{CpuSlice, RawMut};
use rayon::prelude::*;

/// Query rows per forward task.
const BM: usize = 64;
/// Keys per inner tile.
const BN: usize = 64;

/// Where a forward writes its outputs.
pub(crate) struct FwdOut<'a> {
    pub o: RawMut,
    pub o_map: &'a RowMap,
    pub lse: RawMut,
}

/// The inputs of a call: q, k, v as host slices.
#[derive(Clone, Copy)]
pub(crate) struct Qkv<'a> {
    pub q: CpuSlice<'a>,
    pub k: CpuSlice<'a>,
    pub v: CpuSlice<'a>,
}

/// The keys any row of query tile `[i0, i1)` can see (ranges are monotone in the row).
fn tile_key_range(p: &Problem, seq: usize, i0: usize, i1: usize) -> (usize, usize) {
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let first = p.mask.key_range(i0, sq, sk);
    let last = p.mask.key_range(i1 - 1, sq, sk);
    let lo = first.start.min(last.start);
    let hi = first.end.max(last.end);
    if lo >= hi {
        // Every row's range may be empty only if both ends are; ranges in between lie between them.
        (0, 0)
    } else {
        (lo, hi)
    }
}

fn tasks(p: &Problem, heads: usize, rows: impl Fn(usize) -> usize, tile: usize) -> Vec<(usize, usize, usize)> {
    let mut t = Vec::new();
    for seq in 0..p.batch {
        for h in 0..heads {
            let n = rows(seq);
            for r0 in (0..n).step_by(tile) {
                t.push((seq, h, r0));
            }
        }
    }
    t
}

/// The forward pass.
pub(crate) fn forward(p: &Problem, x: Qkv<'_>, out: &FwdOut<'_>) {
    let d = p.d;
    tasks(p, p.h, |s| p.seqlen_q[s], BM)
        .into_par_iter()
        .for_each_init(|| FwdScratch::new(d), |sc, (seq, head, i0)| forward_tile(p, x, out, sc, seq, head, i0));
}

struct FwdScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl FwdScratch {
    fn new(d: usize) -> Self {
        FwdScratch {
            q: vec![0.0; BM * d],
            k: vec![0.0; BN * d],
            v: vec![0.0; BN * d],
            s: vec![0.0; BM * BN],
            acc: vec![0.0; BM * d],
            m: vec![0.0; BM],
            l: vec![0.0; BM],
        }
    }
}

/// Whether this x86-64 CPU has AVX2 and FMA (checked once; the hot loops are compiled twice, for the
/// baseline target and for AVX2+FMA, and the faster copy is picked at run time).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `$name` calling `$body_fn` through an AVX2+FMA copy when the CPU has it.
macro_rules! multiversion {
    ($name:ident, $avx:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        multiversion!($name, $avx, $body_fn, ($($arg: $ty),*) -> ());
    };
    ($name:ident, $avx:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx($($arg: $ty),*) -> $ret {
            $body_fn($($arg),*)
        }
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU supports the features the copy was compiled for (checked above).
                return unsafe { $avx($($arg),*) };
            }
            $body_fn($($arg),*)
        }
    };
}

multiversion!(forward_tile, forward_tile_avx2, forward_tile_body, (p: &Problem, x: Qkv<'_>, out: &FwdOut<'_>, sc: &mut FwdScratch, seq: usize, head: usize, i0: usize));

#[inline(always)]
fn forward_tile_body(
    p: &Problem,
    x: Qkv<'_>,
    out: &FwdOut<'_>,
    sc: &mut FwdScratch,
    seq: usize,
    head: usize,
    i0: usize,
) {
    let d = p.d;
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let i1 = (i0 + BM).min(sq);
    let bm = i1 - i0;
    let kh = kv_head(head, p.h, p.hk);
    let f = ScoreFn::new(p, seq, head);
    load_rows(x.q, &p.q, seq, head, i0, bm, d, &mut sc.q);
    sc.acc[..bm * d].fill(0.0);
    sc.m[..bm].fill(f32::NEG_INFINITY);
    sc.l[..bm].fill(0.0);
    let ranges: Vec<_> = (i0..i1).map(|i| p.mask.key_range(i, sq, sk)).collect();
    let (lo, hi) = tile_key_range(p, seq, i0, i1);
    let mut j0 = lo - lo % BN;
    while j0 < hi {
        let j1 = (j0 + BN).min(sk);
        let bn = j1 - j0;
        load_rows(x.k, &p.k, seq, kh, j0, bn, d, &mut sc.k);
        load_rows(x.v, &p.v, seq, kh, j0, bn, d, &mut sc.v);
        for (r, range) in ranges.iter().enumerate() {
            let (a, b) = (range.start.max(j0), range.end.min(j1));
            if a >= b {
                continue;
            }
            let qr = &sc.q[r * d..(r + 1) * d];
            let srow = &mut sc.s[r * BN..r * BN + bn];
            let mut mx = sc.m[r];
            for j in a..b {
                let (s, _) = f.apply(dot(qr, &sc.k[(j - j0) * d..(j - j0 + 1) * d]), i0 + r, j);
                srow[j - j0] = s;
                mx = mx.max(s);
            }
            let alpha = (sc.m[r] - mx).exp(); // m = -inf the first time: alpha = 0
            sc.m[r] = mx;
            let acc = &mut sc.acc[r * d..(r + 1) * d];
            if alpha != 1.0 {
                acc.iter_mut().for_each(|v| *v *= alpha);
            }
            let mut l = sc.l[r] * alpha;
            let prow = &mut srow[a - j0..b - j0];
            for x in prow.iter_mut() {
                *x = (*x - mx).exp();
                l += *x;
            }
            pv_row(acc, prow, &sc.v[(a - j0) * d..(b - j0) * d], d);
            sc.l[r] = l;
        }
        j0 = j1;
    }
    let mut row = vec![0f32; d];
    for r in 0..bm {
        let (o_row, lse) = if sc.l[r] > 0.0 {
            let inv = 1.0 / sc.l[r];
            row.iter_mut().zip(&sc.acc[r * d..(r + 1) * d]).for_each(|(o, a)| *o = a * inv);
            (&row, sc.m[r] + sc.l[r].ln())
        } else {
            row.fill(0.0);
            (&row, f32::NEG_INFINITY)
        };
        out.o.write_f32(out.o_map.at(seq, i0 + r, head), o_row);
        out.lse.write_f32(p.lse_index(seq, head, i0 + r), &[lse]);
    }
}

/// Inputs of the backward pass beyond q, k, v.
pub(crate) struct BwdIn<'a> {
    pub dout: CpuSlice<'a>,
    pub do_map: &'a RowMap,
    /// Contiguous lse in [`Problem::lse_shape`].
    pub lse: &'a [f32],
    /// `D = rowsum(dO ∘ O)` given by the caller (same layout as `lse`), for a call that sees only some of
    /// each row's keys (a ring attention block pair, whose `lse` is the whole row's): `None` computes it
    /// from the recomputed `P` and `dP`, which is exact only when the call sees every key of the row.
    pub delta: Option<&'a [f32]>,
}

/// Where the backward writes.
pub(crate) struct BwdOut<'a> {
    pub dq: RawMut,
    pub dq_map: &'a RowMap,
    pub dk: RawMut,
    pub dk_map: &'a RowMap,
    pub dv: RawMut,
    pub dv_map: &'a RowMap,
}

/// For score `(i, j)` recomputed from `q_i`, `k_j`: the probability `P_ij = exp(s - lse_i)` and the gradient
/// of the raw product `q_i · k_j`, `scale · P_ij (dO_i · v_j - D_i) · softcap'(s)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn prob_and_dscore(
    f: &ScoreFn,
    qi: &[f32],
    doi: &[f32],
    kj: &[f32],
    vj: &[f32],
    i: usize,
    j: usize,
    lse: f32,
    di: f32,
) -> (f32, f32) {
    let (s, t) = f.apply(dot(qi, kj), i, j);
    let pij = (s - lse).exp();
    let mut ds = pij * (dot(doi, vj) - di);
    if f.softcap > 0.0 {
        ds *= 1.0 - t * t;
    }
    (pij, ds * f.scale)
}

/// The backward pass (deterministic: fixed summation order, no atomics).
///
/// `D_i = sum_j P_ij dP_ij` (mathematically `rowsum(dO_i ∘ O_i)`) is computed from the recomputed `P` and `dP`
/// rather than from the forward's rounded `O`: in f16/bf16 the rounding of `O` would be the largest error of the
/// whole backward, and the two terms of `dP - D` now cancel exactly where they should (a row that sees one key).
pub(crate) fn backward(p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, out: &BwdOut<'_>) {
    // Pass 1: D and dQ per query tile.
    let rows: Vec<((usize, usize, usize), Vec<f32>)> = tasks(p, p.h, |s| p.seqlen_q[s], BM)
        .into_par_iter()
        .map(|(seq, head, i0)| ((seq, head, i0), dq_tile(p, x, b, out, seq, head, i0)))
        .collect();
    let mut delta = vec![0f32; b.lse.len()];
    for ((seq, head, i0), dd) in rows {
        for (r, v) in dd.into_iter().enumerate() {
            delta[p.lse_index(seq, head, i0 + r)] = v;
        }
    }
    // Pass 2: dK, dV per key tile.
    let delta = &delta;
    tasks(p, p.hk, |s| p.seqlen_k[s], BN)
        .into_par_iter()
        .for_each(|(seq, kh, j0)| dkdv_tile(p, x, b, delta, out, seq, kh, j0));
}

multiversion!(dkdv_tile, dkdv_tile_avx2, dkdv_tile_body, (p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, delta: &[f32], out: &BwdOut<'_>, seq: usize, kh: usize, j0: usize));
multiversion!(dq_tile, dq_tile_avx2, dq_tile_body, (p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, out: &BwdOut<'_>, seq: usize, head: usize, i0: usize) -> Vec<f32>);

/// Pass 2 of the backward: dK and dV of one key tile, over every query head of its group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dkdv_tile_body(
    p: &Problem,
    x: Qkv<'_>,
    b: &BwdIn<'_>,
    delta: &[f32],
    out: &BwdOut<'_>,
    seq: usize,
    kh: usize,
    j0: usize,
) {
    let d = p.d;
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let j1 = (j0 + BN).min(sk);
    let bn = j1 - j0;
    let mut k = vec![0f32; bn * d];
    let mut v = vec![0f32; bn * d];
    load_rows(x.k, &p.k, seq, kh, j0, bn, d, &mut k);
    load_rows(x.v, &p.v, seq, kh, j0, bn, d, &mut v);
    let mut dk = vec![0f32; bn * d];
    let mut dv = vec![0f32; bn * d];
    // Queries that see any key of the tile: query ranges are monotone in the key.
    let qa = p.mask.query_range(j0, sq, sk);
    let qb = p.mask.query_range(j1 - 1, sq, sk);
    let (lo, hi) = (qa.start.min(qb.start), qa.end.max(qb.end));
    let group = p.h / p.hk;
    let mut q = vec![0f32; BM * d];
    let mut g = vec![0f32; BM * d];
    let mut dd = vec![0f32; BM];
    let mut ps = vec![0f32; BN];
    let mut dss = vec![0f32; BN];
    for head in kh * group..(kh + 1) * group {
        let f = ScoreFn::new(p, seq, head);
        let mut i0 = lo;
        while i0 < hi {
            let n = (hi - i0).min(BM);
            load_rows(x.q, &p.q, seq, head, i0, n, d, &mut q);
            load_rows(b.dout, b.do_map, seq, head, i0, n, d, &mut g);
            for (r, x) in dd[..n].iter_mut().enumerate() {
                *x = delta[p.lse_index(seq, head, i0 + r)];
            }
            for r in 0..n {
                let i = i0 + r;
                let lse = b.lse[p.lse_index(seq, head, i)];
                if lse == f32::NEG_INFINITY {
                    continue;
                }
                let range = p.mask.key_range(i, sq, sk);
                let (a, bb) = (range.start.max(j0), range.end.min(j1));
                if a >= bb {
                    continue;
                }
                let qr = &q[r * d..(r + 1) * d];
                let gr = &g[r * d..(r + 1) * d];
                for j in a..bb {
                    let jj = j - j0;
                    (ps[jj], dss[jj]) = prob_and_dscore(
                        &f,
                        qr,
                        gr,
                        &k[jj * d..(jj + 1) * d],
                        &v[jj * d..(jj + 1) * d],
                        i,
                        j,
                        lse,
                        dd[r],
                    );
                }
                for j in a..bb {
                    let jj = j - j0;
                    axpy(&mut dv[jj * d..(jj + 1) * d], ps[jj], gr);
                    axpy(&mut dk[jj * d..(jj + 1) * d], dss[jj], qr);
                }
            }
            i0 += n;
        }
    }
    for jj in 0..bn {
        out.dk.write_f32(out.dk_map.at(seq, j0 + jj, kh), &dk[jj * d..(jj + 1) * d]);
        out.dv.write_f32(out.dv_map.at(seq, j0 + jj, kh), &dv[jj * d..(jj + 1) * d]);
    }
}

/// Pass 1 of the backward: `D` and dQ of one query tile (returns `D` of its rows).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dq_tile_body(
    p: &Problem,
    x: Qkv<'_>,
    b: &BwdIn<'_>,
    out: &BwdOut<'_>,
    seq: usize,
    head: usize,
    i0: usize,
) -> Vec<f32> {
    let d = p.d;
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let i1 = (i0 + BM).min(sq);
    let bm = i1 - i0;
    let kh = kv_head(head, p.h, p.hk);
    let f = ScoreFn::new(p, seq, head);
    let mut q = vec![0f32; bm * d];
    let mut g = vec![0f32; bm * d];
    let mut dd = vec![0f32; bm];
    let mut dq = vec![0f32; bm * d];
    load_rows(x.q, &p.q, seq, head, i0, bm, d, &mut q);
    load_rows(b.dout, b.do_map, seq, head, i0, bm, d, &mut g);
    let (lo, hi) = tile_key_range(p, seq, i0, i1);
    let mut k = vec![0f32; BN * d];
    let mut v = vec![0f32; BN * d];
    if let Some(given) = b.delta {
        for (r, x) in dd.iter_mut().enumerate() {
            *x = given[p.lse_index(seq, head, i0 + r)];
        }
    }
    // Sweep 1: D_i = sum_j P_ij dP_ij (unless the caller gave D).
    let mut j0 = if b.delta.is_some() { hi } else { lo - lo % BN };
    while j0 < hi {
        let j1 = (j0 + BN).min(sk);
        load_rows(x.k, &p.k, seq, kh, j0, j1 - j0, d, &mut k);
        load_rows(x.v, &p.v, seq, kh, j0, j1 - j0, d, &mut v);
        for r in 0..bm {
            let i = i0 + r;
            let lse = b.lse[p.lse_index(seq, head, i)];
            if lse == f32::NEG_INFINITY {
                continue;
            }
            let range = p.mask.key_range(i, sq, sk);
            let (qr, gr) = (&q[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            for j in range.start.max(j0)..range.end.min(j1) {
                let jj = j - j0;
                let (s, _) = f.apply(dot(qr, &k[jj * d..(jj + 1) * d]), i, j);
                dd[r] += (s - lse).exp() * dot(gr, &v[jj * d..(jj + 1) * d]);
            }
        }
        j0 = j1;
    }
    // Sweep 2: dQ += dS K.
    let mut j0 = lo - lo % BN;
    while j0 < hi {
        let j1 = (j0 + BN).min(sk);
        let bn = j1 - j0;
        load_rows(x.k, &p.k, seq, kh, j0, bn, d, &mut k);
        load_rows(x.v, &p.v, seq, kh, j0, bn, d, &mut v);
        for r in 0..bm {
            let i = i0 + r;
            let lse = b.lse[p.lse_index(seq, head, i)];
            if lse == f32::NEG_INFINITY {
                continue;
            }
            let range = p.mask.key_range(i, sq, sk);
            let qr = &q[r * d..(r + 1) * d];
            let gr = &g[r * d..(r + 1) * d];
            for j in range.start.max(j0)..range.end.min(j1) {
                let jj = j - j0;
                let kj = &k[jj * d..(jj + 1) * d];
                let (_, ds) = prob_and_dscore(&f, qr, gr, kj, &v[jj * d..(jj + 1) * d], i, j, lse, dd[r]);
                axpy(&mut dq[r * d..(r + 1) * d], ds, kj);
            }
        }
        j0 = j1;
    }
    for r in 0..bm {
        out.dq.write_f32(out.dq_map.at(seq, i0 + r, head), &dq[r * d..(r + 1) * d]);
    }
    dd
}
