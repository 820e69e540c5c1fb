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
//!
//! Tile products: every score product (`S = Q Kᵀ` in the forward and in both backward passes, `dP = dO Vᵀ`),
//! the forward's `P V` and the backward's gradient products (`dQ += dS K`, `dV += Pᵀ dO`, `dK += dSᵀ Q`) run
//! through the register-tiled kernel of `super::kernel` (independent of the oracle's `crate::gemm`), on
//! operands padded to `W` columns and `R` rows, with `Kᵀ` and `Vᵀ` transposed once per key tile and `Pᵀ`,
//! `dSᵀ` read by columns. The value head dim `d_v` may differ from `d`: `Q Kᵀ`, `dQ`, `dK` run over `d`
//! (padded to `dp`), `dP = dO Vᵀ`, `P V`, `O`, `dO` and `dV` over `d_v` (padded to `dvp`). One kernel for every score product, summing each element in one chain over `k`,
//! keeps a pair's `S` (and `dP`) bit-identical across the forward and both backward passes. Each tile
//! function is compiled three times (plain; AVX2+FMA; AVX-512F), picked at run time (`kernel::level`).
//! Exponentials use the kernel's polynomial `exp` everywhere, so `P = exp(s - lse)` is 1 exactly where
//! `lse` is the row's only score.

use super::kernel::{self, ARef, RMAX as R, WP as W};
use super::tile::{load_rows, pv_row, ScoreFn};
use crate::gemm::{round_up, transpose_into};
use crate::problem::{Problem, RowMap};
use crate::semantics::kv_head;
use crate::tensor::{CpuSlice, RawMut};
use rayon::prelude::*;
use std::ops::Range;

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
    let (d, d_v) = (p.d, p.d_v);
    tasks(p, p.h, |s| p.seqlen_q[s], FBM)
        .into_par_iter()
        .for_each_init(|| FwdScratch::new(d, d_v), |sc, (seq, head, i0)| forward_tile(p, x, out, sc, seq, head, i0));
}

/// Query rows per forward task and per task of the backward's pass 1: the key tile's loading and
/// transposing is shared by this many rows.
const FBM: usize = 128;

struct FwdScratch {
    /// `[FBM, dp]`, `[BN, dp]`, `[d, BN]` (`Kᵀ`), `[BN, dvp]`, `[FBM, BN]`, `[FBM, dvp]`.
    q: Vec<f32>,
    k: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl FwdScratch {
    fn new(d: usize, d_v: usize) -> Self {
        let (dp, dvp) = (round_up(d, W), round_up(d_v, W));
        FwdScratch {
            q: vec![0.0; FBM * dp],
            k: vec![0.0; BN * dp],
            kt: vec![0.0; d * BN],
            v: vec![0.0; BN * dvp],
            s: vec![0.0; FBM * BN],
            acc: vec![0.0; FBM * dvp],
            m: vec![0.0; FBM],
            l: vec![0.0; FBM],
        }
    }
}

/// Defines `$name` calling `$body_fn::<L>` for the instruction-set level of this CPU
/// ([`kernel::level`]): an AVX-512F copy (level 2) and an AVX2+FMA copy (level 1) compiled with those
/// features, else the plain body (level 0).
macro_rules! multiversion {
    ($name:ident, $avx2:ident, $avx512:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        multiversion!($name, $avx2, $avx512, $body_fn, ($($arg: $ty),*) -> ());
    };
    ($name:ident, $avx2:ident, $avx512:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $body_fn::<1>($($arg),*)
        }
        #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[allow(clippy::too_many_arguments, clippy::incompatible_msrv)]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $body_fn::<2>($($arg),*)
        }
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            match kernel::level() {
                // SAFETY: the CPU supports the features each copy was compiled for (`kernel::level`).
                #[cfg(flashattn_avx512)]
                2 => return unsafe { $avx512($($arg),*) },
                // SAFETY: as above.
                1 => return unsafe { $avx2($($arg),*) },
                _ => {}
            }
            $body_fn::<0>($($arg),*)
        }
    };
}

multiversion!(forward_tile, forward_tile_avx2, forward_tile_avx512, forward_tile_body, (p: &Problem, x: Qkv<'_>, out: &FwdOut<'_>, sc: &mut FwdScratch, seq: usize, head: usize, i0: usize));

#[inline(always)]
fn forward_tile_body<const L: u8>(
    p: &Problem,
    x: Qkv<'_>,
    out: &FwdOut<'_>,
    sc: &mut FwdScratch,
    seq: usize,
    head: usize,
    i0: usize,
) {
    let (d, dp) = (p.d, round_up(p.d, W));
    let (dv, dvp) = (p.d_v, round_up(p.d_v, W));
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let i1 = (i0 + FBM).min(sq);
    let bm = i1 - i0;
    let rows = round_up(bm, R);
    let kh = kv_head(head, p.h, p.hk);
    let f = ScoreFn::new(p, seq, head);
    // Only the score transform's scale is on: the transform is one multiply, done over whole rows.
    let plain = f.softcap <= 0.0 && f.slope.is_none();
    load_rows(x.q, &p.q, seq, head, i0, bm, d, dp, &mut sc.q);
    sc.q[bm * dp..rows * dp].fill(0.0);
    sc.acc[..rows * dvp].fill(0.0);
    // A sink starts every row's softmax: running max `sink`, running sum `exp(sink - sink) = 1`.
    let sink = p.sink.as_ref().map(|z| z[head]);
    sc.m[..bm].fill(sink.unwrap_or(f32::NEG_INFINITY));
    sc.l[..bm].fill(if sink.is_some() { 1.0 } else { 0.0 });
    let ranges: Vec<_> = (i0..i1).map(|i| p.mask.key_range(i, sq, sk)).collect();
    // Per register-row group of `R` rows (`R` a multiple of every level's tile height): the keys of tile
    // `[j0, j1)` that every row of the group sees, when each sees exactly those (then the group's `P V` runs
    // through the tile product), else `None` (each row runs its own range through `pv_row`).
    let group_keys = |g: usize, j0: usize, j1: usize| -> Option<Range<usize>> {
        let clip = |r: usize| {
            let rg = ranges.get(r).cloned().unwrap_or(0..0);
            let (a, b) = (rg.start.max(j0), rg.end.min(j1));
            if a < b {
                a..b
            } else {
                0..0
            }
        };
        let first = clip(g);
        (g + 1..g + R).all(|r| clip(r) == first).then_some(first)
    };
    let (lo, hi) = tile_key_range(p, seq, i0, i1);
    let mut j0 = lo - lo % BN;
    while j0 < hi {
        let j1 = (j0 + BN).min(sk);
        let bn = j1 - j0;
        load_rows(x.k, &p.k, seq, kh, j0, bn, d, dp, &mut sc.k);
        if bn < BN {
            sc.kt.fill(0.0);
        }
        transpose_into(&sc.k, bn, dp, d, &mut sc.kt, BN);
        load_rows(x.v, &p.v, seq, kh, j0, bn, dv, dvp, &mut sc.v);
        tile_product::<L>(d, dp, rows, &sc.q, &sc.kt, tile_cols(lo.max(j0), hi.min(j1), j0), &mut sc.s);
        for (r, range) in ranges.iter().enumerate() {
            let (a, b) = (range.start.max(j0), range.end.min(j1));
            if a >= b {
                continue;
            }
            let srow = &mut sc.s[r * BN..r * BN + bn];
            let mut mx = sc.m[r];
            if plain {
                for x in &mut srow[a - j0..b - j0] {
                    *x *= f.scale;
                    mx = mx.max(*x);
                }
            } else {
                for j in a..b {
                    let (s, _) = f.apply(srow[j - j0], i0 + r, j);
                    srow[j - j0] = s;
                    mx = mx.max(s);
                }
            }
            // While every score seen is -inf (or NaN, which `max` skips) the row's max is -inf: the
            // exponentials are then taken against 0, so a -inf score weighs 0 and a NaN stays NaN (never
            // `-inf - -inf`).
            let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
            let alpha = kernel::exp1(sc.m[r] - base); // m = -inf the first time: alpha = 0
            sc.m[r] = mx;
            if alpha != 1.0 {
                sc.acc[r * dvp..r * dvp + dv].iter_mut().for_each(|v| *v *= alpha);
            }
            let prow = &mut srow[a - j0..b - j0];
            prow.iter_mut().for_each(|x| *x -= base);
            kernel::exp_slice(prow);
            sc.l[r] = sc.l[r] * alpha + prow.iter().sum::<f32>();
        }
        // P V: whole row groups through the tile product where every row sees the same keys of the tile,
        // the others row by row (a masked key's value never meets a zero weight: `0 * NaN` would leak).
        let mut any_full = false;
        for g in (0..rows).step_by(R) {
            match group_keys(g, j0, j1) {
                Some(k) => any_full |= !k.is_empty(),
                None => {
                    for (r, range) in ranges.iter().enumerate().take((g + R).min(bm)).skip(g) {
                        let (a, b) = (range.start.max(j0), range.end.min(j1));
                        if a < b {
                            let prow = &sc.s[r * BN + a - j0..r * BN + b - j0];
                            pv_row(&mut sc.acc[r * dvp..r * dvp + dv], prow, &sc.v[(a - j0) * dvp..], dv, dvp);
                        }
                    }
                }
            }
        }
        if any_full {
            // The kernel's row groups (of its level's height, which divides `R`) take their `R`-row group's keys.
            // A group that sees no key of this tile has the empty range `0..0` (not relative to `j0`).
            let keys = |i: usize| match group_keys(i - i % R, j0, j1) {
                Some(k) if !k.is_empty() => k.start - j0..k.end - j0,
                _ => 0..0,
            };
            kernel::gemm::<L>(ARef { a: &sc.s, rs: BN, cs: 1 }, &sc.v, dvp, &mut sc.acc, dvp, rows, keys, 0..dvp);
        }
        j0 = j1;
    }
    let mut row = vec![0f32; dv];
    for (r, range) in ranges.iter().enumerate() {
        // Only a row whose mask leaves no key is reported empty (o = 0, lse = -inf, or the sink with one). A
        // NaN score, a +inf score (`inf - inf`) or a NaN/inf value has made `l` or `acc` non-finite, and that
        // propagates to o and lse; a row whose visible scores are all -inf has `l = 0` (without a sink) and
        // reports NaN.
        let (o_row, lse) = if range.is_empty() {
            row.fill(0.0);
            (&row, sink.unwrap_or(f32::NEG_INFINITY))
        } else if sc.l[r] == 0.0 {
            row.fill(f32::NAN);
            (&row, f32::NAN)
        } else {
            let inv = 1.0 / sc.l[r];
            row.iter_mut().zip(&sc.acc[r * dvp..r * dvp + dv]).for_each(|(o, a)| *o = a * inv);
            let m = if sc.m[r] == f32::NEG_INFINITY { 0.0 } else { sc.m[r] };
            (&row, m + sc.l[r].ln())
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

/// For scores `(i, j)`, `j` in `js` (a row of the key tile at `j0`), with raw products `qk = q_i · k_j` and
/// `dp = dO_i · v_j` (slices over `js`): the probabilities `P_ij = exp(s - lse)` into `pm` and the gradients
/// of the raw products, `scale · P_ij (dP_ij - D_i) · softcap'(s)`, into `ds`. `plain`: the score transform
/// is the scale alone (a loop the compiler vectorises, exponentials included).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn prob_dscore_row(
    f: &ScoreFn,
    plain: bool,
    i: usize,
    js: Range<usize>,
    qk: &[f32],
    dp: &[f32],
    pm: &mut [f32],
    ds: &mut [f32],
    lse: f32,
    di: f32,
) {
    let n = js.len();
    let (qk, dp, pm, ds) = (&qk[..n], &dp[..n], &mut pm[..n], &mut ds[..n]);
    if plain {
        for e in 0..n {
            let pij = kernel::exp1(qk[e] * f.scale - lse);
            pm[e] = pij;
            ds[e] = pij * (dp[e] - di) * f.scale;
        }
        return;
    }
    for (e, j) in js.enumerate() {
        let (s, t) = f.apply(qk[e], i, j);
        let pij = kernel::exp1(s - lse);
        let mut g = pij * (dp[e] - di);
        if f.softcap > 0.0 {
            g *= 1.0 - t * t;
        }
        pm[e] = pij;
        ds[e] = g * f.scale;
    }
}

/// One key tile's operands of the score products, transposed once: `Kᵀ` as `[d, BN]` and `Vᵀ` as `[d_v, BN]`
/// (columns past the tile's keys are 0), and `K` row-major `[BN, dp]` for `dQ += dS K`.
struct KeyTile {
    k: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
}

impl KeyTile {
    fn new(p: &Problem) -> Self {
        let dp = round_up(p.d, W);
        KeyTile { k: vec![0.0; BN * dp], kt: vec![0.0; p.d * BN], vt: vec![0.0; p.d_v * BN] }
    }

    /// Loads keys `j0..j0 + bn` of `(seq, kh)` (the row-major `K` only when `keep_k`); `buf` is scratch of
    /// at least `BN * max(dp, dvp)` elements.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn load(
        &mut self,
        p: &Problem,
        x: Qkv<'_>,
        seq: usize,
        kh: usize,
        j0: usize,
        bn: usize,
        keep_k: bool,
        buf: &mut [f32],
    ) {
        let (d, dp) = (p.d, round_up(p.d, W));
        let (dv, dvp) = (p.d_v, round_up(p.d_v, W));
        if bn < BN {
            self.kt.fill(0.0);
            self.vt.fill(0.0);
        }
        let kbuf: &mut [f32] = if keep_k { &mut self.k } else { buf };
        load_rows(x.k, &p.k, seq, kh, j0, bn, d, dp, kbuf);
        transpose_into(kbuf, bn, dp, d, &mut self.kt, BN);
        load_rows(x.v, &p.v, seq, kh, j0, bn, dv, dvp, buf);
        transpose_into(buf, bn, dvp, dv, &mut self.vt, BN);
    }
}

/// `C = A Bᵀ` of `rows` rows of `a` (`[rows, dp]`) against one key tile's transposed operand `bt`
/// (`[d, BN]`), over the tile's columns `cols` (aligned to `W`; the others are left 0). Every score product
/// of the CPU backend (`S = Q Kᵀ` in the forward and both backward passes, `dP = dO Vᵀ`) is computed here, so
/// a pair's `S` is bit-identical in all three and its `dP` in both backward passes: the `lse` of a row that
/// sees one key is exactly its score, `P = 1`, and that row's `dS = P (dP - D)` cancels exactly.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_product<const L: u8>(
    d: usize,
    dp: usize,
    rows: usize,
    a: &[f32],
    bt: &[f32],
    cols: Range<usize>,
    c: &mut [f32],
) {
    c[..rows * BN].fill(0.0);
    kernel::gemm::<L>(ARef { a, rs: dp, cs: 1 }, bt, BN, c, BN, rows, |_| 0..d, cols);
}

/// `S = Q Kᵀ` and `dP = dO Vᵀ` of `rows` query rows (`q` `[rows, dp]`, `g` `[rows, dvp]`) against one key tile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores<const L: u8>(
    p: &Problem,
    rows: usize,
    q: &[f32],
    g: &[f32],
    t: &KeyTile,
    cols: Range<usize>,
    s: &mut [f32],
    dpm: &mut [f32],
) {
    tile_product::<L>(p.d, round_up(p.d, W), rows, q, &t.kt, cols.clone(), s);
    tile_product::<L>(p.d_v, round_up(p.d_v, W), rows, g, &t.vt, cols, dpm);
}

/// The tile columns `[a - j0, b - j0)` widened to multiples of `W` (within `BN`).
fn tile_cols(a: usize, b: usize, j0: usize) -> Range<usize> {
    if a >= b {
        0..0
    } else {
        (a - j0) / W * W..round_up(b - j0, W)
    }
}

/// The backward pass (deterministic: fixed summation order, no atomics).
///
/// `D_i = sum_j P_ij dP_ij` (mathematically `rowsum(dO_i ∘ O_i)`) is computed from the recomputed `P` and `dP`
/// rather than from the forward's rounded `O`: in f16/bf16 the rounding of `O` would be the largest error of the
/// whole backward, and the two terms of `dP - D` now cancel exactly where they should (a row that sees one key).
///
/// Returns `D` (in [`Problem::lse_shape`] order): a learnable sink's gradient is made from it.
pub(crate) fn backward(p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, out: &BwdOut<'_>) -> Vec<f32> {
    // Pass 1: D and dQ per query tile.
    let rows: Vec<((usize, usize, usize), Vec<f32>)> = tasks(p, p.h, |s| p.seqlen_q[s], FBM)
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
    tasks(p, p.hk, |s| p.seqlen_k[s], BN)
        .into_par_iter()
        .for_each(|(seq, kh, j0)| dkdv_tile(p, x, b, &delta, out, seq, kh, j0));
    delta
}

multiversion!(dkdv_tile, dkdv_tile_avx2, dkdv_tile_avx512, dkdv_tile_body, (p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, delta: &[f32], out: &BwdOut<'_>, seq: usize, kh: usize, j0: usize));
multiversion!(dq_tile, dq_tile_avx2, dq_tile_avx512, dq_tile_body, (p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, out: &BwdOut<'_>, seq: usize, head: usize, i0: usize) -> Vec<f32>);

/// Pass 2 of the backward: dK and dV of one key tile, over every query head of its group. Per block of `BM`
/// queries: `S`, `dP` (as in pass 1), then `P` and `dS` elementwise, then `dV += Pᵀ dO` and `dK += dSᵀ Q`
/// (`Pᵀ`, `dSᵀ` read by columns of the tile).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dkdv_tile_body<const L: u8>(
    p: &Problem,
    x: Qkv<'_>,
    b: &BwdIn<'_>,
    delta: &[f32],
    out: &BwdOut<'_>,
    seq: usize,
    kh: usize,
    j0: usize,
) {
    let (d, dp) = (p.d, round_up(p.d, W));
    let (d_v, dvp) = (p.d_v, round_up(p.d_v, W));
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let j1 = (j0 + BN).min(sk);
    let bn = j1 - j0;
    let bnr = round_up(bn, R);
    let mut t = KeyTile::new(p);
    let mut q = vec![0f32; BM * dp];
    let mut g = vec![0f32; BM * dvp];
    t.load(p, x, seq, kh, j0, bn, false, &mut vec![0f32; BN * dp.max(dvp)]);
    let mut dk = vec![0f32; BN * dp];
    let mut dv = vec![0f32; BN * dvp];
    // Queries that see any key of the tile: query ranges are monotone in the key.
    let qa = p.mask.query_range(j0, sq, sk);
    let qb = p.mask.query_range(j1 - 1, sq, sk);
    let (lo, hi) = (qa.start.min(qb.start), qa.end.max(qb.end));
    let group = p.h / p.hk;
    let mut s = vec![0f32; BM * BN];
    let mut dpm = vec![0f32; BM * BN];
    let mut pm = vec![0f32; BM * BN];
    let mut ds = vec![0f32; BM * BN];
    for head in kh * group..(kh + 1) * group {
        let f = ScoreFn::new(p, seq, head);
        let plain = f.softcap <= 0.0 && f.slope.is_none();
        let mut i0 = lo;
        while i0 < hi {
            let n = (hi - i0).min(BM);
            let rows = round_up(n, R);
            load_rows(x.q, &p.q, seq, head, i0, n, d, dp, &mut q);
            load_rows(b.dout, b.do_map, seq, head, i0, n, d_v, dvp, &mut g);
            // A row that saw no key contributes nothing: its q and dO rows are zeroed so that a non-finite
            // value in them cannot reach dK, dV through the products' zero weights (`0 * NaN`).
            for r in 0..n {
                if b.lse[p.lse_index(seq, head, i0 + r)] == f32::NEG_INFINITY {
                    q[r * dp..(r + 1) * dp].fill(0.0);
                    g[r * dvp..(r + 1) * dvp].fill(0.0);
                }
            }
            let (ka, kb) = tile_key_range(p, seq, i0, i0 + n);
            let cols = tile_cols(ka.max(j0), kb.min(j1), j0);
            scores::<L>(p, rows, &q, &g, &t, cols, &mut s, &mut dpm);
            pm[..rows * BN].fill(0.0);
            ds[..rows * BN].fill(0.0);
            for r in 0..n {
                let i = i0 + r;
                let lse = b.lse[p.lse_index(seq, head, i)];
                if lse == f32::NEG_INFINITY {
                    continue;
                }
                let di = delta[p.lse_index(seq, head, i)];
                let range = p.mask.key_range(i, sq, sk);
                let js = range.start.max(j0)..range.end.min(j1);
                if js.is_empty() {
                    continue;
                }
                let e = r * BN + js.start - j0;
                let (pr, dr) = (&mut pm[e..], &mut ds[e..]);
                prob_dscore_row(&f, plain, i, js, &s[e..], &dpm[e..], pr, dr, lse, di);
            }
            kernel::gemm::<L>(ARef { a: &pm, rs: 1, cs: BN }, &g, dvp, &mut dv, dvp, bnr, |_| 0..n, 0..dvp);
            kernel::gemm::<L>(ARef { a: &ds, rs: 1, cs: BN }, &q, dp, &mut dk, dp, bnr, |_| 0..n, 0..dp);
            i0 += n;
        }
    }
    for jj in 0..bn {
        out.dk.write_f32(out.dk_map.at(seq, j0 + jj, kh), &dk[jj * dp..jj * dp + d]);
        out.dv.write_f32(out.dv_map.at(seq, j0 + jj, kh), &dv[jj * dvp..jj * dvp + d_v]);
    }
}

/// Pass 1 of the backward: `D` and dQ of one query tile (returns `D` of its rows). Two sweeps over the key
/// tiles the rows can see, each computing `S` and `dP` per tile: the first sums `D`, the second `dQ += dS K`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dq_tile_body<const L: u8>(
    p: &Problem,
    x: Qkv<'_>,
    b: &BwdIn<'_>,
    out: &BwdOut<'_>,
    seq: usize,
    head: usize,
    i0: usize,
) -> Vec<f32> {
    let (d, dp) = (p.d, round_up(p.d, W));
    let (d_v, dvp) = (p.d_v, round_up(p.d_v, W));
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let i1 = (i0 + FBM).min(sq);
    let bm = i1 - i0;
    let rows = round_up(bm, R);
    let kh = kv_head(head, p.h, p.hk);
    let f = ScoreFn::new(p, seq, head);
    let mut q = vec![0f32; rows * dp];
    let mut g = vec![0f32; rows * dvp];
    let mut dd = vec![0f32; bm];
    let mut dq = vec![0f32; rows * dp];
    load_rows(x.q, &p.q, seq, head, i0, bm, d, dp, &mut q);
    load_rows(b.dout, b.do_map, seq, head, i0, bm, d_v, dvp, &mut g);
    let lse: Vec<f32> = (i0..i1).map(|i| b.lse[p.lse_index(seq, head, i)]).collect();
    let ranges: Vec<_> = (i0..i1).map(|i| p.mask.key_range(i, sq, sk)).collect();
    let (lo, hi) = tile_key_range(p, seq, i0, i1);
    let mut t = KeyTile::new(p);
    let mut buf = vec![0f32; BN * dp.max(dvp)];
    let mut s = vec![0f32; rows * BN];
    let mut dpm = vec![0f32; rows * BN];
    let mut ds = vec![0f32; rows * BN];
    let mut pm = vec![0f32; BN];
    let plain = f.softcap <= 0.0 && f.slope.is_none();
    if let Some(given) = b.delta {
        for (r, x) in dd.iter_mut().enumerate() {
            *x = given[p.lse_index(seq, head, i0 + r)];
        }
    }
    // Sweep 1: D_i = sum_j P_ij dP_ij (unless the caller gave D).
    let mut j0 = if b.delta.is_some() { hi } else { lo - lo % BN };
    while j0 < hi {
        let j1 = (j0 + BN).min(sk);
        t.load(p, x, seq, kh, j0, j1 - j0, false, &mut buf);
        scores::<L>(p, rows, &q, &g, &t, tile_cols(lo.max(j0), hi.min(j1), j0), &mut s, &mut dpm);
        for r in 0..bm {
            if lse[r] == f32::NEG_INFINITY {
                continue;
            }
            let js = ranges[r].start.max(j0)..ranges[r].end.min(j1);
            if js.is_empty() {
                continue;
            }
            let (e, n) = (r * BN + js.start - j0, js.len());
            let pr = &mut pm[..n];
            if plain {
                pr.iter_mut().zip(&s[e..e + n]).for_each(|(x, &qk)| *x = qk * f.scale - lse[r]);
            } else {
                for (x, j) in pr.iter_mut().zip(js) {
                    *x = f.apply(s[r * BN + j - j0], i0 + r, j).0 - lse[r];
                }
            }
            kernel::exp_slice(pr);
            for (x, dpv) in pr.iter().zip(&dpm[e..e + n]) {
                dd[r] += x * dpv;
            }
        }
        j0 = j1;
    }
    // Sweep 2: dQ += dS K.
    let mut j0 = lo - lo % BN;
    while j0 < hi {
        let j1 = (j0 + BN).min(sk);
        let bn = j1 - j0;
        t.load(p, x, seq, kh, j0, bn, true, &mut buf);
        let (a, bb) = (lo.max(j0), hi.min(j1));
        scores::<L>(p, rows, &q, &g, &t, tile_cols(a, bb, j0), &mut s, &mut dpm);
        ds.fill(0.0);
        for r in 0..bm {
            if lse[r] == f32::NEG_INFINITY {
                continue;
            }
            let js = ranges[r].start.max(j0)..ranges[r].end.min(j1);
            if js.is_empty() {
                continue;
            }
            let e = r * BN + js.start - j0;
            prob_dscore_row(&f, plain, i0 + r, js, &s[e..], &dpm[e..], &mut pm, &mut ds[e..], lse[r], dd[r]);
        }
        kernel::gemm::<L>(ARef { a: &ds, rs: BN, cs: 1 }, &t.k, dp, &mut dq, dp, rows, |_| a - j0..bb - j0, 0..dp);
        j0 = j1;
    }
    for r in 0..bm {
        if lse[r] == f32::NEG_INFINITY {
            // A row that saw no key has zero gradient, whatever the (unweighted) keys of its tiles hold.
            dq[r * dp..r * dp + d].fill(0.0);
        }
        out.dq.write_f32(out.dq_map.at(seq, i0 + r, head), &dq[r * dp..r * dp + d]);
    }
    dd
}
