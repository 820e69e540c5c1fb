//! Tiled FlashAttention on the CPU, forward and backward.
//!
//! Keys and values: per (sequence, key head) they are converted to `f32` once and packed into key-tile panels
//! (`Kᵀ`, `K`, `V`, `Vᵀ` as the pass needs, [`Panels`]) shared by every task of that pair, in waves of
//! bounded size ([`PANEL_BUDGET`]): O(seqlen) extra memory.
//!
//! Forward: one task per (sequence, query head, tile of `FBM` query rows). Each task walks the key tiles its
//! rows can see (block skipping from the mask), keeping a running max `m`, running sum `l` and an `f32`
//! accumulator (online softmax), so the score matrix is never stored.
//!
//! Backward: one sweep, query tiles outermost, that never races and so is deterministic (see [`backward`]):
//! per query tile, `D = rowsum(P ∘ dP)` from the recomputed `P` and `dP`, then per key tile `dS = P ∘ (dP -
//! D)` and `dQ += dS K`, `dV += Pᵀ dO`, `dK += dSᵀ Q`, the last two into per-task partial sums reduced in a
//! fixed order. The forward's `o` is not read (unless the caller gives `D`, as ring attention does for its
//! partial rows): `D` from the recomputed `P` and `dP` is exact where `rowsum(dO ∘ O)` would carry the rounding
//! of `O` (to f16/bf16; and even in f32 a row that sees one key needs `dP - D` to cancel exactly, which `D` from
//! `o` does not give: tried, it broke the f32 rule for dk at sk = 1 with soft-capping).
//!
//! Tile products: every score product (`S = Q Kᵀ` in the forward and in both backward sweeps, `dP = dO Vᵀ`),
//! the forward's `P V` and the backward's gradient products (`dQ += dS K`, `dV += Pᵀ dO`, `dK += dSᵀ Q`) run
//! through the register-tiled kernel of `super::kernel` (independent of the oracle's `crate::gemm`), on
//! operands padded to `W` columns and `R` rows, with `Kᵀ` and `Vᵀ` transposed once per (sequence, key head) and `Pᵀ`,
//! `dSᵀ` read by columns. The value head dim `d_v` may differ from `d`: `Q Kᵀ`, `dQ`, `dK` run over `d`
//! (padded to `dp`), `dP = dO Vᵀ`, `P V`, `O`, `dO` and `dV` over `d_v` (padded to `dvp`). One kernel for every score product, summing each element in one chain over `k`,
//! keeps a pair's `S` (and `dP`) bit-identical across the forward and both backward sweeps. Each tile
//! function is compiled three times (plain; AVX2+FMA; AVX-512F), picked at run time (`kernel::level`).
//! Exponentials use the kernel's polynomial `exp` everywhere, so `P = exp(s - lse)` is 1 exactly where
//! `lse` is the row's only score.

use super::kernel::{self, ARef, RMAX as R, WP as W};
use super::pool::Buf;
use super::tile::{load_rows, pv_row, ScoreFn};
use crate::gemm::{round_up, transpose_into};
use crate::problem::{Problem, RowMap};
use crate::tensor::{CpuSlice, RawMut};
use rayon::prelude::*;
use std::ops::Range;

/// Keys per inner tile.
const BN: usize = 128;

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

/// The forward pass.
pub(crate) fn forward(p: &Problem, x: Qkv<'_>, out: &FwdOut<'_>) {
    // No query row: nothing to write. Returning here keeps the cost of a zero-size call independent of its
    // batch and head counts (which a zero-length dim leaves unbounded by the tensors' sizes).
    if p.seqlen_q.iter().all(|&s| s == 0) {
        return;
    }
    let (d, d_v) = (p.d, p.d_v);
    let need = Need { bf: use_bf16(x, None), kt: true, k: false, v: true, vt: false };
    for wave in waves(p, need) {
        let panels = pack_wave(p, x, &wave, need);
        let group = p.h / p.hk;
        let mut t = Vec::new();
        for (w, &(seq, kh)) in wave.iter().enumerate() {
            for head in kh * group..(kh + 1) * group {
                for i0 in (0..p.seqlen_q[seq]).step_by(FBM) {
                    t.push((w, seq, head, i0));
                }
            }
        }
        t.into_par_iter().for_each_init(
            || FwdScratch::new(d, d_v),
            |sc, (w, seq, head, i0)| forward_tile(p, &panels[w], out, x, sc, seq, head, i0),
        );
    }
}

/// Query rows per forward task and per query tile of the backward: each key tile's products are shared by
/// this many rows.
const FBM: usize = 128;

/// Which key-tile panels a pass reads: `Kᵀ` (`[d, BN]` per tile), `K` (`[BN, dp]`), `V` (`[BN, dvp]`), `Vᵀ`
/// (`[d_v, BN]`).
#[derive(Clone, Copy)]
struct Need {
    /// `Kᵀ` and `Vᵀ` as bf16 pairs ([`Panels::ktb`], [`Panels::vtb`]) instead of `f32`.
    bf: bool,
    kt: bool,
    k: bool,
    v: bool,
    vt: bool,
}

/// One (sequence, key head)'s keys and values converted to `f32` once, in key tiles of `BN` (zero past the
/// last key), laid out as the tile products read them. Packed once and shared by every query tile and every
/// query head of the group, instead of each task re-reading (and converting, transposing) the key rows
/// from the `[b, s, h, d]` layout, where consecutive rows are a head stride apart.
struct Panels {
    kt: Buf<f32>,
    k: Buf<f32>,
    v: Buf<f32>,
    vt: Buf<f32>,
    /// With bf16 inputs at SIMD level 3 (`Need::bf`), `Kᵀ` and `Vᵀ` in bf16 pairs for `kernel::gemm_bf16`
    /// (`[d.div_ceil(2), BN]` and `[d_v.div_ceil(2), BN]` per tile), and `kt`, `vt` are empty.
    ktb: Buf<u32>,
    vtb: Buf<u32>,
    /// With `Need::bf`, `K` and `V` (when needed) also in bf16 pairs of consecutive keys, `[BN / 2, dp]` and
    /// `[BN / 2, dvp]` per tile, for the products that reduce over keys (`dQ += dS K`, `O += P V`).
    kp: Buf<u32>,
    vp: Buf<u32>,
}

/// One key tile's transposed operand of a score product: `f32` `[d, BN]` or bf16 pairs `[d.div_ceil(2), BN]`.
#[derive(Clone, Copy)]
enum TileOp<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u32]),
}

impl Panels {
    /// `Kᵀ` of key tile `t`.
    fn kt(&self, p: &Problem, t: usize) -> TileOp<'_> {
        tile_op(&self.kt, &self.ktb, t, p.d)
    }

    /// `K` of key tile `t` in pairs of keys (`[BN / 2, dp]`; empty without `Need::bf`).
    fn kp(&self, p: &Problem, t: usize) -> &[u32] {
        if self.kp.is_empty() {
            &[]
        } else {
            tile(&self.kp, t, round_up(p.d, W) / 2)
        }
    }

    /// `V` of key tile `t` in pairs of keys (`[BN / 2, dvp]`; empty without `Need::bf`).
    fn vp(&self, p: &Problem, t: usize) -> &[u32] {
        if self.vp.is_empty() {
            &[]
        } else {
            tile(&self.vp, t, round_up(p.d_v, W) / 2)
        }
    }

    /// `Vᵀ` of key tile `t`.
    fn vt(&self, p: &Problem, t: usize) -> TileOp<'_> {
        tile_op(&self.vt, &self.vtb, t, p.d_v)
    }
}

/// Key tile `t` of a panel of `BN`-row tiles with rows of `len` elements.
#[inline(always)]
fn tile<T>(panel: &[T], t: usize, len: usize) -> &[T] {
    &panel[t * BN * len..(t + 1) * BN * len]
}

/// [`tile`], writable.
#[inline(always)]
fn tile_mut<T>(panel: &mut [T], t: usize, len: usize) -> &mut [T] {
    &mut panel[t * BN * len..(t + 1) * BN * len]
}

/// Key tile `t` of a transposed panel of an operand with head dim `d`: from the bf16 pair panel `pairs` when it
/// is in use (not empty), else from the `f32` panel `f`.
fn tile_op<'a>(f: &'a [f32], pairs: &'a [u32], t: usize, d: usize) -> TileOp<'a> {
    if pairs.is_empty() {
        TileOp::F32(tile(f, t, d))
    } else {
        TileOp::Bf16(tile(pairs, t, d.div_ceil(2)))
    }
}

/// Whether the score products run on bf16 pairs (`kernel::gemm_bf16`): bf16 q, k, v (and `dout`, when given)
/// on a CPU at SIMD level 3. Their values are then exactly bf16 after conversion to `f32`, so the pairs are
/// exact.
fn use_bf16(x: Qkv<'_>, dout: Option<CpuSlice<'_>>) -> bool {
    let bf = |s: CpuSlice<'_>| matches!(s, CpuSlice::BF16(_));
    cfg!(all(target_arch = "x86_64", flashattn_avx512))
        && kernel::level() >= 3
        && bf(x.q)
        && bf(x.k)
        && bf(x.v)
        && dout.into_iter().all(bf)
}

/// Packs the first `d` rows of a transposed tile `tt` (`[d, BN]`) into bf16 pairs `out` (`[d.div_ceil(2), BN]`):
/// `out[kk * BN + j]` holds rows `2kk` and `2kk + 1` of column `j` (0 past row `d`).
fn pack_tile_pairs(tt: &[f32], d: usize, out: &mut [u32]) {
    kernel::pack_row_pairs::<false, false>(tt, BN, d / 2, BN, out, BN);
    if d % 2 == 1 {
        // The last row pairs with zeros.
        let (last, dst) = (&tt[(d - 1) * BN..d * BN], &mut out[d / 2 * BN..(d / 2 + 1) * BN]);
        dst.iter_mut().zip(last).for_each(|(o, &v)| *o = v.to_bits() >> 16);
    }
}

/// Most bytes of packed panels alive at once: the (sequence, key head) pairs are processed in waves of at
/// most this much (one pair at least), so the extra memory stays bounded whatever the batch and head count.
const PANEL_BUDGET: usize = 128 << 20;

fn panel_floats(p: &Problem, seq: usize, need: Need) -> usize {
    let (dp, dvp) = (round_up(p.d, W), round_up(p.d_v, W));
    let n = round_up(p.seqlen_k[seq], BN);
    // With `need.bf` the key-pair panels of K and V add half of each (and the transposed ones are halved).
    let pairs = if need.bf { (need.k as usize * dp + need.v as usize * dvp) / 2 } else { 0 };
    n * (need.kt as usize * p.d + need.k as usize * dp + need.v as usize * dvp + need.vt as usize * p.d_v + pairs)
}

/// The (sequence, key head) pairs in waves of at most [`PANEL_BUDGET`] bytes of panels each (one pair at least),
/// with the bytes spread evenly over the waves ([`even_waves`]): the backward runs one task per pair when its
/// partials are large, so a wave of 5 pairs and one of 3 would leave a thread idle for a fifth of the time where
/// two waves of 4 keep both busy.
fn waves(p: &Problem, need: Need) -> Vec<Vec<(usize, usize)>> {
    let pairs = (0..p.batch).flat_map(|seq| {
        let b = panel_floats(p, seq, need) * 4;
        (0..p.hk).map(move |kh| ((seq, kh), b))
    });
    even_waves(pairs.collect(), PANEL_BUDGET)
}

/// `items` (each with its size), in order, in waves of at most `budget` (one item at least): the wave count of a
/// greedy fill sets an even share of the total per wave, and a wave is cut where the running total passes its
/// share (an item goes to the wave that holds its middle) or where the budget would be passed (which can add a
/// wave to the greedy count).
fn even_waves<T>(items: Vec<(T, usize)>, budget: usize) -> Vec<Vec<T>> {
    let mut count = 1;
    let mut bytes = 0;
    for (i, &(_, b)) in items.iter().enumerate() {
        if i > 0 && bytes + b > budget {
            count += 1;
            bytes = 0;
        }
        bytes += b;
    }
    let share = items.iter().map(|&(_, b)| b).sum::<usize>().div_ceil(count);
    let mut all = vec![Vec::new()];
    let (mut bytes, mut before) = (0, 0);
    for (item, b) in items {
        let started = !all.last().expect("never empty").is_empty();
        if started && (before + b / 2 > share * all.len() || bytes + b > budget) {
            all.push(Vec::new());
            bytes = 0;
        }
        all.last_mut().expect("never empty").push(item);
        bytes += b;
        before += b;
    }
    all
}

/// Where [`pack_tile`] puts a tile's transpose: nowhere, as f32 (`[w, BN]`), or as bf16 column pairs.
enum Transposed<'a> {
    None,
    F32(&'a mut [f32]),
    Pairs(&'a mut [u32]),
}

impl<'a> Transposed<'a> {
    /// Where key tile `t` of an operand with head dim `d` goes transposed: nowhere unless `wanted`, else into
    /// its bf16 pair panel `pairs` (with `bf`) or its `f32` panel `f`.
    fn of_tile(wanted: bool, bf: bool, t: usize, d: usize, f: &'a mut [f32], pairs: &'a mut [u32]) -> Self {
        match (wanted, bf) {
            (false, _) => Transposed::None,
            (true, true) => Transposed::Pairs(tile_mut(pairs, t, d.div_ceil(2))),
            (true, false) => Transposed::F32(tile_mut(f, t, d)),
        }
    }
}

/// Loads key tile `(seq, head, j0, bn)` of K or V (width `w`, padded to `wp`) into `rows`, multiplied by `mul`
/// (the FP8 descale, else 1), and stores its transpose as `tr` asks (the pair form goes through the scratch
/// `tt`, `[w, BN]`).
#[allow(clippy::too_many_arguments)]
fn pack_tile(
    src: CpuSlice<'_>,
    map: &RowMap,
    (seq, head, j0, bn): (usize, usize, usize, usize),
    (w, wp): (usize, usize),
    rows: &mut [f32],
    tr: Transposed<'_>,
    tt: &mut [f32],
    mul: f32,
) {
    load_rows(src, map, seq, head, j0, bn, w, wp, rows, mul);
    match tr {
        Transposed::None => {}
        Transposed::F32(out) => transpose_into(rows, bn, wp, w, out, BN),
        Transposed::Pairs(out) => {
            tt.fill(0.0);
            transpose_into(rows, bn, wp, w, tt, BN);
            pack_tile_pairs(tt, w, out);
        }
    }
}

/// Packs the panels of every pair of a wave (in parallel over pairs).
fn pack_wave(p: &Problem, x: Qkv<'_>, wave: &[(usize, usize)], need: Need) -> Vec<Panels> {
    wave.par_iter()
        .map(|&(seq, kh)| {
            let (d, dp) = (p.d, round_up(p.d, W));
            let (dv, dvp) = (p.d_v, round_up(p.d_v, W));
            let sk = p.seqlen_k[seq];
            let nt = sk.div_ceil(BN);
            let mut pn = Panels {
                kt: Buf::empty(),
                k: Buf::empty(),
                v: Buf::empty(),
                vt: Buf::empty(),
                ktb: Buf::empty(),
                vtb: Buf::empty(),
                kp: Buf::empty(),
                vp: Buf::empty(),
            };
            let (d2, dv2) = (d.div_ceil(2), dv.div_ceil(2));
            // With `need.bf` the transposed tiles go through `tt` into the pair panels.
            let mut tt = Buf::<f32>::zeroed(if need.bf { BN * d.max(dv) } else { 0 });
            if need.kt && need.bf {
                pn.ktb = Buf::zeroed(nt * BN * d2);
            } else if need.kt {
                pn.kt = Buf::zeroed(nt * BN * d);
            }
            if need.k {
                pn.k = Buf::zeroed(nt * BN * dp);
            }
            if need.v {
                pn.v = Buf::zeroed(nt * BN * dvp);
            }
            if need.vt && need.bf {
                pn.vtb = Buf::zeroed(nt * BN * dv2);
            } else if need.vt {
                pn.vt = Buf::zeroed(nt * BN * dv);
            }
            if need.bf && need.k {
                pn.kp = Buf::zeroed(nt * BN / 2 * dp);
            }
            if need.bf && need.v {
                pn.vp = Buf::zeroed(nt * BN / 2 * dvp);
            }
            let mut buf = Buf::<f32>::zeroed(BN * dp.max(dvp));
            for t in 0..nt {
                let (j0, bn) = (t * BN, BN.min(sk - t * BN));
                let at = (seq, kh, j0, bn);
                if need.kt || need.k {
                    let rows = if need.k { tile_mut(&mut pn.k, t, dp) } else { &mut buf };
                    let tr = Transposed::of_tile(need.kt, need.bf, t, d, &mut pn.kt, &mut pn.ktb);
                    pack_tile(x.k, &p.k, at, (d, dp), rows, tr, &mut tt, p.k_scale(seq, kh));
                }
                if need.v || need.vt {
                    let rows = if need.v { tile_mut(&mut pn.v, t, dvp) } else { &mut buf };
                    let tr = Transposed::of_tile(need.vt, need.bf, t, dv, &mut pn.vt, &mut pn.vtb);
                    pack_tile(x.v, &p.v, at, (dv, dvp), rows, tr, &mut tt, p.v_scale(seq, kh));
                }
                // Key pairs of the row panels (exact: the values are bf16; zero past the last key).
                if !pn.kp.is_empty() {
                    let dst = tile_mut(&mut pn.kp, t, dp / 2);
                    kernel::pack_row_pairs::<false, false>(tile(&pn.k, t, dp), dp, BN / 2, dp, dst, dp);
                }
                if !pn.vp.is_empty() {
                    let dst = tile_mut(&mut pn.vp, t, dvp / 2);
                    kernel::pack_row_pairs::<false, false>(tile(&pn.v, t, dvp), dvp, BN / 2, dvp, dst, dvp);
                }
            }
            pn
        })
        .collect()
}

struct FwdScratch {
    /// `[FBM, dp]`, `[FBM, d.div_ceil(2)]` (bf16 pairs of `q`), `[FBM, BN / 2]` (bf16 pairs of `P`), `[FBM, BN]`,
    /// `[FBM, dvp]`.
    q: Buf<f32>,
    qb: Buf<u32>,
    pb: Buf<u32>,
    s: Buf<f32>,
    acc: Buf<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Per row, the running maximum after the current key tile (`[FBM]`), then the factor `exp(m_old - base)`
    /// the row's sum and accumulator are rescaled by.
    mx: Vec<f32>,
    alpha: Vec<f32>,
}

impl FwdScratch {
    fn new(d: usize, d_v: usize) -> Self {
        let (dp, dvp) = (round_up(d, W), round_up(d_v, W));
        FwdScratch {
            q: Buf::zeroed(FBM * dp),
            qb: Buf::zeroed(FBM * d.div_ceil(2)),
            pb: Buf::zeroed(FBM * BN / 2),
            s: Buf::zeroed(FBM * BN),
            acc: Buf::zeroed(FBM * dvp),
            m: vec![0.0; FBM],
            l: vec![0.0; FBM],
            mx: vec![0.0; FBM],
            alpha: vec![0.0; FBM],
        }
    }
}

/// Lanes of the row reductions below: 16 partial results, combined in a fixed order at the end, so the
/// loops vectorise (a single running sum would be a serial chain) and the result depends only on the data.
const LANES: usize = 16;

/// The maximum of `init` and `x` (NaN skipped, as `f32::max` does).
/// From level 2 with AVX-512F ([`row_max_avx512`]).
#[inline(always)]
fn row_max<const L: u8>(x: &[f32], init: f32) -> f32 {
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    if L >= 2 {
        // SAFETY: level 2 or more: the CPU has AVX-512F.
        return unsafe { row_max_avx512(x, init) };
    }
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut ch = x.chunks_exact(LANES);
    for c in &mut ch {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    // The lanes pairwise (a tree of 4 steps, not a serial chain of 16: this runs once per row and key tile).
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            m[l] = m[l].max(m[l + w]);
        }
    }
    ch.remainder().iter().fold(init.max(m[0]), |a, &b| a.max(b))
}

/// The lanes of a 16-lane step over `n` remaining elements: all 16 when `n >= 16`, else the first `n`.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline(always)]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
fn tail_mask(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= LANES {
        !0
    } else {
        (1u16 << n) - 1
    }
}

/// [`row_max`] with AVX-512F. `vmaxps a, b` returns `b` when either is NaN, so `max(x, m)` with a running `m`
/// that is never NaN skips NaN elements as `f32::max` does; the lanes are then NaN-free and reduce with plain
/// maxima (exact, so their order does not matter).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
unsafe fn row_max_avx512(x: &[f32], init: f32) -> f32 {
    use std::arch::x86_64::*;
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = ninf;
    let mut ch = x.chunks_exact(LANES);
    for c in &mut ch {
        m = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), m);
    }
    let rest = ch.remainder();
    if !rest.is_empty() {
        let k = tail_mask(rest.len());
        m = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, k, rest.as_ptr()), m);
    }
    init.max(_mm512_reduce_max_ps(m))
}

/// `x = exp(x mul - base)` ([`kernel::exp_softmax`]; the product rounded before the subtraction, so a score
/// equal to the maximum gives exactly 1) and the sum of the new `x` (in [`LANES`] partial sums). `base` is the
/// maximum of the rounded products `x mul` (or 0 when every one is `-inf`), so every argument is at most 0.
/// From level 2 the exponentials are [`kernel::exp_softmax_avx512`]'s.
#[inline(always)]
fn exp_sum<const L: u8>(x: &mut [f32], mul: f32, base: f32) -> f32 {
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    if L >= 2 {
        // SAFETY: level 2 or more: the CPU has AVX-512F.
        return unsafe { exp_sum_avx512(x, mul, base) };
    }
    let mut s = [0f32; LANES];
    let mut ch = x.chunks_exact_mut(LANES);
    for c in &mut ch {
        for l in 0..LANES {
            c[l] = kernel::exp_softmax(c[l] * mul - base);
            s[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for v in ch.into_remainder() {
        *v = kernel::exp_softmax(*v * mul - base);
        tail += *v;
    }
    lane_sum(s) + tail
}

/// [`exp_sum`] with AVX-512F: 16 lanes per step, the last partial step masked (its lanes load and add nothing).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
unsafe fn exp_sum_avx512(x: &mut [f32], mul: f32, base: f32) -> f32 {
    use std::arch::x86_64::*;
    let (m, b) = (_mm512_set1_ps(mul), _mm512_set1_ps(base));
    let mut sum = _mm512_setzero_ps();
    let mut ch = x.chunks_exact_mut(LANES);
    for c in &mut ch {
        let p = c.as_mut_ptr();
        let e = kernel::exp_softmax_avx512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p), m), b));
        _mm512_storeu_ps(p, e);
        sum = _mm512_add_ps(sum, e);
    }
    let rest = ch.into_remainder();
    if !rest.is_empty() {
        let k = tail_mask(rest.len());
        let p = rest.as_mut_ptr();
        let e = kernel::exp_softmax_avx512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), m), b));
        _mm512_mask_storeu_ps(p, k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    let mut lanes = [0f32; LANES];
    _mm512_storeu_ps(lanes.as_mut_ptr(), sum);
    lane_sum(lanes)
}

/// The sum of [`LANES`] partial sums, pairwise in a fixed order.
#[inline(always)]
fn lane_sum(mut s: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            s[l] += s[l + w];
        }
    }
    s[0]
}

/// Defines `$name` calling `$body_fn::<L>` for the instruction-set level of this CPU
/// ([`kernel::level`]): an AVX-512F + AVX-512-BF16 copy (level 3), an AVX-512F copy (level 2) and an AVX2+FMA
/// copy (level 1) compiled with those features, else the plain body (level 0).
macro_rules! multiversion {
    ($name:ident, $avx2:ident, $avx512:ident, $bf16:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        multiversion!($name, $avx2, $avx512, $bf16, $body_fn, ($($arg: $ty),*) -> ());
    };
    ($name:ident, $avx2:ident, $avx512:ident, $bf16:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
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
        #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
        #[target_feature(enable = "avx512f,avx512bf16,avx2,fma")]
        #[allow(clippy::too_many_arguments, clippy::incompatible_msrv)]
        unsafe fn $bf16($($arg: $ty),*) -> $ret {
            $body_fn::<3>($($arg),*)
        }
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            match kernel::level() {
                // SAFETY: the CPU supports the features each copy was compiled for (`kernel::level`).
                #[cfg(flashattn_avx512)]
                3 => return unsafe { $bf16($($arg),*) },
                // SAFETY: as above.
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

multiversion!(forward_tile, forward_tile_avx2, forward_tile_avx512, forward_tile_bf16, forward_tile_body, (p: &Problem, pn: &Panels, out: &FwdOut<'_>, x: Qkv<'_>, sc: &mut FwdScratch, seq: usize, head: usize, i0: usize));

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_tile_body<const L: u8>(
    p: &Problem,
    pn: &Panels,
    out: &FwdOut<'_>,
    x: Qkv<'_>,
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
    let f = ScoreFn::new(p, seq, head);
    // Only the score transform's scale is on, and it is positive: the scale is applied inside the exponential's
    // argument (`s scale - max`), and the row maximum is taken over the raw products (one pass that only reads).
    let scale_only = f.softcap <= 0.0 && f.slope.is_none() && f.scale > 0.0;
    load_rows(x.q, &p.q, seq, head, i0, bm, d, dp, &mut sc.q, p.q_scale(seq, head));
    sc.q[bm * dp..rows * dp].fill(0.0);
    let qop = rows_op(!pn.ktb.is_empty(), &sc.q, rows, d, dp, &mut sc.qb);
    sc.acc[..rows * dvp].fill(0.0);
    // The running maximum and sum are over the scores alone; a sink joins each row's denominator once, at the
    // end. So the row's largest score always weighs exactly `exp(0) = 1` in `P V`, also where the sink is larger
    // (starting the maximum at the sink would leave every weight of such a row below 1, rounded to bf16 for the
    // product: a row led by one key then gets a rounded multiple of that key's value).
    let sink = p.sink.as_ref().map(|z| z[head]);
    sc.m[..bm].fill(f32::NEG_INFINITY);
    sc.l[..bm].fill(0.0);
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
        let t = j0 / BN;
        let v = tile(&pn.v, t, dvp);
        score_product::<L>(d, rows, qop, pn.kt(p, t), tile_cols(lo.max(j0), hi.min(j1), j0), &mut sc.s);
        // Three passes over the tile's rows, so that the rescale factors (one exponential per row) run as one
        // vectorised loop instead of a scalar chain inside each row's work. 1: each row's new running maximum
        // (the old one for a row that sees no key of the tile).
        for (r, range) in ranges.iter().enumerate() {
            let (a, b) = (range.start.max(j0), range.end.min(j1));
            let mut mx = sc.m[r];
            if a < b {
                let srow = &mut sc.s[r * BN..r * BN + bn];
                if scale_only {
                    // The largest rounded `s * scale` is the rounded `max(s) * scale` (rounding is monotonic).
                    mx = mx.max(row_max::<L>(&srow[a - j0..b - j0], f32::NEG_INFINITY) * f.scale);
                } else {
                    for j in a..b {
                        let (s, _) = f.apply(srow[j - j0], i0 + r, j);
                        srow[j - j0] = s;
                        mx = mx.max(s);
                    }
                }
            }
            sc.mx[r] = mx;
        }
        // 2: while every score seen is -inf (or NaN, which `max` skips) the row's max is -inf: the exponentials
        // are then taken against 0, so a -inf score weighs 0 and a NaN stays NaN (never `-inf - -inf`). The
        // factor is `exp(m_old - base)` (0 the first time, when `m_old = -inf`; 1 for a row without keys here).
        for ((alpha, &m_old), &mx) in sc.alpha[..bm].iter_mut().zip(&sc.m[..bm]).zip(&sc.mx[..bm]) {
            let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
            *alpha = kernel::exp1(m_old - base);
        }
        // 3: rescale, exponentials and sums. `mul`: what the stored products are still to be multiplied by
        // inside the exponential.
        let mul = if scale_only { f.scale } else { 1.0 };
        for (r, range) in ranges.iter().enumerate() {
            let (a, b) = (range.start.max(j0), range.end.min(j1));
            if a >= b {
                continue;
            }
            let (mx, alpha) = (sc.mx[r], sc.alpha[r]);
            let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
            sc.m[r] = mx;
            if alpha != 1.0 {
                sc.acc[r * dvp..r * dvp + dv].iter_mut().for_each(|v| *v *= alpha);
            }
            let srow = &mut sc.s[r * BN + a - j0..r * BN + b - j0];
            sc.l[r] = sc.l[r] * alpha + exp_sum::<L>(srow, mul, base);
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
                            pv_row(&mut sc.acc[r * dvp..r * dvp + dv], prow, &v[(a - j0) * dvp..], dv, dvp);
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
            let vp = pn.vp(p, t);
            if vp.is_empty() {
                kernel::gemm::<L>(ARef { a: &sc.s, rs: BN, cs: 1 }, v, dvp, &mut sc.acc, dvp, rows, keys, 0..dvp);
            } else {
                keys_product::<L>(&sc.s, &mut sc.pb, v, vp, dvp, &mut sc.acc, rows, keys);
            }
        }
        j0 = j1;
    }
    let mut row = vec![0f32; dv];
    for (r, range) in ranges.iter().enumerate() {
        // Only a row whose mask leaves no key is reported empty (o = 0, lse = -inf, or the sink with one). A
        // NaN score, a +inf score (`inf - inf`) or a NaN/inf value has made `l` or `acc` non-finite, and that
        // propagates to o and lse; a row whose visible scores are all -inf has `l = 0` (see below).
        let (o_row, lse) = if range.is_empty() {
            row.fill(0.0);
            (&row, sink.unwrap_or(f32::NEG_INFINITY))
        } else if sc.l[r] == 0.0 {
            // Every visible score is -inf: without a sink the row reports NaN; with one, the sink takes the whole
            // softmax (`o` is the zero-weighted sum, 0 for finite values, and `lse` the sink).
            match sink {
                Some(z) => {
                    row.iter_mut().zip(&sc.acc[r * dvp..r * dvp + dv]).for_each(|(o, &a)| *o = a);
                    (&row, z)
                }
                None => {
                    row.fill(f32::NAN);
                    (&row, f32::NAN)
                }
            }
        } else {
            let m = if sc.m[r] == f32::NEG_INFINITY { 0.0 } else { sc.m[r] };
            // With a sink, against `M = max(m, sink)` (so a sink far above the scores cannot overflow):
            // l' = l exp(m - M) + exp(sink - M), o = acc exp(m - M) / l', lse = M + ln l'.
            let (lse, inv) = match sink {
                Some(z) => {
                    let mm = m.max(z);
                    let alpha = kernel::exp1(m - mm);
                    let ls = sc.l[r] * alpha + kernel::exp1(z - mm);
                    (mm + ls.ln(), alpha / ls)
                }
                None => (m + sc.l[r].ln(), 1.0 / sc.l[r]),
            };
            row.iter_mut().zip(&sc.acc[r * dvp..r * dvp + dv]).for_each(|(o, a)| *o = a * inv);
            (&row, lse)
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
    /// each row's keys (a ring attention block pair, whose `lse` is the whole row's), or read from an f32 `o`:
    /// `None` computes it from the recomputed `P` and `dP`, which is exact only when the call sees every key of
    /// the row.
    pub delta: Option<&'a [f32]>,
    /// The call sees every key of each row (not a ring's block pair): a row with exactly one visible key then
    /// takes `D = P dP` from its recomputed products even when `delta` is given, so that `dP - D` cancels
    /// exactly as the softmax's constancy says (its `dS`, and its share of `dK`, are then 0, not a rounding).
    pub whole_rows: bool,
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

/// One row of a key tile's scores in the backward: query row `i` (row `r` of its query tile, log-sum-exp `lse`)
/// over its keys `js` in the tile, whose raw products `qk = q_i · k_j` and `dp = dO_i · v_j` (slices over
/// `js`) start at offset `e` of the tile's `[rows, BN]` products.
#[derive(Clone)]
struct TileRow<'s> {
    r: usize,
    i: usize,
    js: Range<usize>,
    e: usize,
    qk: &'s [f32],
    dp: &'s [f32],
    lse: f32,
}

/// The [`TileRow`]s of the query tile at row `i0` against the key tile `j0..j1`, over the tile's products `s`
/// (`Q Kᵀ`) and `dpm` (`dO Vᵀ`): the rows that see keys of the tile (`ranges`: each row's keys). Rows that saw
/// no key at all (`lse = -inf`) are skipped.
fn tile_rows<'s>(
    (i0, j0, j1): (usize, usize, usize),
    lse: &'s [f32],
    ranges: &'s [Range<usize>],
    s: &'s [f32],
    dpm: &'s [f32],
) -> impl Iterator<Item = TileRow<'s>> + 's {
    lse.iter().zip(ranges).enumerate().filter_map(move |(r, (&lse, keys))| {
        let js = keys.start.max(j0)..keys.end.min(j1);
        if lse == f32::NEG_INFINITY || js.is_empty() {
            return None;
        }
        let e = r * BN + js.start - j0;
        Some(TileRow { r, i: i0 + r, js, e, qk: &s[e..], dp: &dpm[e..], lse })
    })
}

/// For the scores of `row` (`P_ij = exp(s - lse)`, [`kernel::exp_softmax`]: `lse` is the logarithm of a sum
/// that holds `e^s`, so `s - lse` is at most a rounding error above 0): the probabilities into `pm` and the
/// gradients of the raw products, `scale · P_ij (dP_ij - D_i) · softcap'(s)`, into `ds` (both slices over the
/// row's keys).
/// `plain`: the score transform is the scale alone (a loop the compiler vectorises, exponentials included).
#[inline(always)]
fn prob_dscore_row<const L: u8>(f: &ScoreFn, plain: bool, row: TileRow<'_>, pm: &mut [f32], ds: &mut [f32], di: f32) {
    let TileRow { i, js, lse, .. } = row;
    let n = js.len();
    let (qk, dp, pm, ds) = (&row.qk[..n], &row.dp[..n], &mut pm[..n], &mut ds[..n]);
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    if plain && L >= 2 {
        // SAFETY: level 2 or more: the CPU has AVX-512F; the four slices have length `n`.
        unsafe { prob_dscore_plain_avx512(qk, dp, pm, ds, f.scale, lse, di) };
        return;
    }
    if plain {
        for e in 0..n {
            let pij = kernel::exp_softmax(qk[e] * f.scale - lse);
            pm[e] = pij;
            ds[e] = pij * (dp[e] - di) * f.scale;
        }
        return;
    }
    for (e, j) in js.enumerate() {
        let (s, t) = f.apply(qk[e], i, j);
        let pij = kernel::exp_softmax(s - lse);
        let mut g = pij * (dp[e] - di);
        if f.softcap > 0.0 {
            g *= 1.0 - t * t;
        }
        pm[e] = pij;
        ds[e] = g * f.scale;
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
    // The product's columns are written (`=`); the others are zeroed, as the tile's consumers expect.
    zero_outside(c, rows, &cols);
    kernel::gemm_into::<L, false>(ARef { a, rs: dp, cs: 1 }, bt, BN, c, BN, rows, |_| 0..d, cols);
}

/// Zeroes the columns of a `[rows, BN]` tile outside `cols` (all of them when `cols` is empty).
#[inline(always)]
fn zero_outside(c: &mut [f32], rows: usize, cols: &Range<usize>) {
    if cols.start == 0 && cols.end == BN {
        return;
    }
    for row in c[..rows * BN].chunks_exact_mut(BN) {
        row[..cols.start].fill(0.0);
        row[cols.end..].fill(0.0);
    }
}

/// A query tile's operand of a score product (`Q` or `dO`, `rows` rows): `f32` `[rows, dp]` or bf16 pairs
/// `[rows, d.div_ceil(2)]`, matching the key tile's [`TileOp`].
#[derive(Clone, Copy)]
enum RowsOp<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u32]),
}

/// [`tile_product`] of a query tile's operand against a key tile's (`d` the depth), through
/// `kernel::gemm_bf16` for bf16 pairs (level 3 only: pairs are packed only there, [`use_bf16`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn score_product<const L: u8>(d: usize, rows: usize, a: RowsOp<'_>, bt: TileOp<'_>, cols: Range<usize>, c: &mut [f32]) {
    match (a, bt) {
        (RowsOp::F32(a), TileOp::F32(bt)) => tile_product::<L>(d, round_up(d, W), rows, a, bt, cols, c),
        #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
        (RowsOp::Bf16(a), TileOp::Bf16(bt)) if L >= 3 => {
            c[..rows * BN].fill(0.0);
            let d2 = d.div_ceil(2);
            // SAFETY: the level-3 copy runs only where the CPU has AVX-512F and AVX-512-BF16 (`kernel::level`).
            unsafe { kernel::gemm_bf16::<false>(a, d2, bt, BN, c, BN, rows, |_| 0..d2, cols) };
        }
        _ => unreachable!("bf16 pairs are packed only at SIMD level 3, for both operands"),
    }
}

/// `S = Q Kᵀ` and `dP = dO Vᵀ` of `rows` query rows (`q`, `g`) against key tile `t` of `pn`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores<const L: u8>(
    p: &Problem,
    pn: &Panels,
    t: usize,
    rows: usize,
    q: RowsOp<'_>,
    g: RowsOp<'_>,
    cols: Range<usize>,
    s: &mut [f32],
    dpm: &mut [f32],
) {
    score_product::<L>(p.d, rows, q, pn.kt(p, t), cols.clone(), s);
    score_product::<L>(p.d_v, rows, g, pn.vt(p, t), cols, dpm);
}

/// `x` (`rows` rows of `d` values, leading dimension `ld`) as bf16 pairs in `pairs` (`[rows, d.div_ceil(2)]`)
/// when `bf`, for [`score_product`].
fn rows_op<'a>(bf: bool, x: &'a [f32], rows: usize, d: usize, ld: usize, pairs: &'a mut [u32]) -> RowsOp<'a> {
    if !bf {
        return RowsOp::F32(x);
    }
    let d2 = d.div_ceil(2);
    for r in 0..rows {
        kernel::pack_pairs(&x[r * ld..r * ld + d], d, &mut pairs[r * d2..(r + 1) * d2]);
    }
    RowsOp::Bf16(pairs)
}

/// `C += A B` for bf16 pairs (`kernel::gemm_bf16`, accumulating): `A` `[rows, lda]` pairs, `B` `[.., ldb]` pairs,
/// each 8-row group over its pair range `kr(i0)`, all `ldb` columns. Level 3 only (pairs are packed only there).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_pairs<const L: u8>(
    a: &[u32],
    lda: usize,
    b: &[u32],
    ldb: usize,
    c: &mut [f32],
    rows: usize,
    kr: impl Fn(usize) -> Range<usize>,
) {
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    if L >= 3 {
        // SAFETY: the level-3 copy runs only where the CPU has AVX-512F and AVX-512-BF16 (`kernel::level`).
        unsafe { kernel::gemm_bf16::<true>(a, lda, b, ldb, c, ldb, rows, kr, 0..ldb) };
        return;
    }
    let _ = (a, lda, b, ldb, c, rows, kr);
    unreachable!("bf16 pairs are packed only at SIMD level 3");
}

/// `C += A B` over one key tile, reducing over keys: `A` the `f32` tile `a` (`[rows, BN]`: probabilities or
/// score gradients), `B` the tile's rows `b` (`[BN, ldb]`, `f32`) and the same as key pairs `bp` (`[BN / 2, ldb]`),
/// each 8-row group over its keys `kr(i0)` (relative to the tile). The key pairs inside a range run in bf16
/// (`A` rounded to bf16, as the spec's baseline rounds `p`; `ap` is scratch of `[rows, BN / 2]`), a key at an odd
/// end of a range in `f32`, so that no key outside the range is read (a masked key's value never meets a zero
/// weight: `0 * NaN` would leak).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn keys_product<const L: u8>(
    a: &[f32],
    ap: &mut [u32],
    b: &[f32],
    bp: &[u32],
    ldb: usize,
    c: &mut [f32],
    rows: usize,
    kr: impl Fn(usize) -> Range<usize>,
) {
    const H: usize = BN / 2;
    let pairs = |i0: usize| {
        let k = kr(i0);
        if k.is_empty() {
            0..0
        } else {
            k.start.div_ceil(2)..k.end / 2
        }
    };
    for g in (0..rows).step_by(R) {
        kernel::pack_rows_rounded(&a[g * BN..], BN, R, pairs(g), &mut ap[g * H..], H);
    }
    gemm_pairs::<L>(ap, H, bp, ldb, c, rows, pairs);
    let odd_start = |i0: usize| {
        let k = kr(i0);
        if !k.is_empty() && k.start % 2 == 1 {
            k.start..k.start + 1
        } else {
            0..0
        }
    };
    let odd_end = |i0: usize| {
        let k = kr(i0);
        // An odd end's key `k.end - 1` is even, so never the odd start's key above.
        if !k.is_empty() && k.end % 2 == 1 {
            k.end - 1..k.end
        } else {
            0..0
        }
    };
    kernel::gemm::<L>(ARef { a, rs: BN, cs: 1 }, b, ldb, c, ldb, rows, odd_start, 0..ldb);
    kernel::gemm::<L>(ARef { a, rs: BN, cs: 1 }, b, ldb, c, ldb, rows, odd_end, 0..ldb);
}

/// The tile columns `[a - j0, b - j0)` widened to multiples of `W` (within `BN`).
fn tile_cols(a: usize, b: usize, j0: usize) -> Range<usize> {
    if a >= b {
        0..0
    } else {
        (a - j0) / W * W..round_up(b - j0, W)
    }
}

/// Tasks the backward aims for in all (when the problem has enough query tiles): a (sequence, key head) pair's
/// query tiles are split over `ceil(BWD_TASKS / (b * hk))` tasks, each with its own partial `dK`, `dV`. A
/// constant, not the thread count, so the summation order (and so every bit of the result) is the same
/// whatever the number of threads. Fewer where the partials of all pairs would pass [`PARTIAL_BUDGET`].
const BWD_TASKS: usize = 16;

/// Bytes of partial `dK`, `dV` (all pairs' tasks together, at the longest sequence) above which the backward
/// splits a pair over fewer tasks (one at least): a single long head gets `64 MiB / (sk (dp + dvp) 4)` tasks.
/// With one task per pair the task writes its pair's gradients itself and keeps no partial.
const PARTIAL_BUDGET: usize = 64 << 20;

/// Most `f32` values of `S` and `dP` a backward task keeps from its D sweep for the second sweep (one query
/// tile's worth: 2 x 128 rows x the keys it sees, so 32 MiB covers 32k keys): longer rows recompute them.
const SCORE_CACHE_FLOATS: usize = 8 << 20;

/// A backward task's results: its partial `dK` (`[tiles * BN, dp]`), `dV` (`[tiles * BN, dvp]`) of the pair's
/// keys, and `D` of its query tiles (query head, first row, values).
struct BwdPart {
    dk: Buf<f32>,
    dv: Buf<f32>,
    delta: Vec<(usize, usize, Vec<f32>)>,
}

/// The backward pass (deterministic: fixed summation order, no atomics).
///
/// One sweep over the (query tile, key tile) pairs, query tiles outermost: per query tile, `D` first (unless
/// given: one pass over its key tiles computing `S`, `dP`, `P`, keeping `S` and `dP` where they fit in
/// [`SCORE_CACHE_FLOATS`]), then per key tile `S`, `dP` (kept or recomputed), `P`, `dS` and
/// the three gradient products `dQ += dS K` (held for the query tile), `dV += Pᵀ dO` and `dK += dSᵀ Q` (into
/// the task's partial `dK`, `dV` of the pair's keys, O(seqlen) per task). The query tiles of a (sequence,
/// key head) pair (every query head of its group) are dealt round-robin to a fixed number of tasks (so a
/// causal mask's long and short rows mix); their partial `dK`, `dV` are summed in task order. Keys and values
/// are packed once per pair ([`Panels`]).
///
/// `D_i = sum_j P_ij dP_ij` (mathematically `rowsum(dO_i ∘ O_i)`) is computed from the recomputed `P` and `dP`
/// rather than from the forward's rounded `O`: in f16/bf16 the rounding of `O` would be the largest error of the
/// whole backward, and the two terms of `dP - D` now cancel exactly where they should (a row that sees one key).
///
/// Returns `D` (in [`Problem::lse_shape`] order): a learnable sink's gradient is made from it.
pub(crate) fn backward(p: &Problem, x: Qkv<'_>, b: &BwdIn<'_>, out: &BwdOut<'_>) -> Vec<f32> {
    // No query row and no key: no gradient element to write (as in `forward`, a zero-size call costs nothing
    // whatever its batch and head counts).
    if p.seqlen_q.iter().all(|&s| s == 0) && p.seqlen_k.iter().all(|&s| s == 0) {
        return vec![0f32; b.lse.len()];
    }
    let need = Need { bf: use_bf16(x, Some(b.dout)), kt: true, k: true, v: false, vt: true };
    let pairs = (p.batch * p.hk).max(1);
    let part_bytes = (round_up(p.max_seqlen_k(), BN) * (round_up(p.d, W) + round_up(p.d_v, W)) * 4).max(1);
    let per_pair = BWD_TASKS.div_ceil(pairs).min((PARTIAL_BUDGET / (pairs * part_bytes)).max(1));
    let mut delta = vec![0f32; b.lse.len()];
    for wave in waves(p, need) {
        let panels = pack_wave(p, x, &wave, need);
        // (pair in wave, task of the pair, tasks of the pair)
        let mut t = Vec::new();
        for (w, &(seq, _)) in wave.iter().enumerate() {
            let n = per_pair.min(p.seqlen_q[seq].div_ceil(FBM)).max(1);
            t.extend((0..n).map(|c| (w, c, n)));
        }
        let parts: Vec<BwdPart> = t
            .par_iter()
            .map(|&(w, c, n)| {
                let (seq, kh) = wave[w];
                bwd_task(p, &panels[w], x, b, out, seq, kh, c, n)
            })
            .collect();
        // Per pair: its tasks' partial dK, dV summed in task order, written out.
        let mut by_pair: Vec<Vec<BwdPart>> = wave.iter().map(|_| Vec::new()).collect();
        for (&(w, _, _), part) in t.iter().zip(parts) {
            by_pair[w].push(part);
        }
        by_pair.par_iter_mut().enumerate().for_each(|(w, parts)| {
            let (seq, kh) = wave[w];
            let (dp, dvp) = (round_up(p.d, W), round_up(p.d_v, W));
            let (first, rest) = parts.split_first_mut().expect("one task per pair at least");
            if first.dk.is_empty() {
                return; // a pair's only task wrote its dK, dV itself
            }
            for part in rest.iter() {
                first.dk.iter_mut().zip(part.dk.iter()).for_each(|(a, b)| *a += b);
                first.dv.iter_mut().zip(part.dv.iter()).for_each(|(a, b)| *a += b);
            }
            for j in 0..p.seqlen_k[seq] {
                out.dk.write_f32(out.dk_map.at(seq, j, kh), &first.dk[j * dp..j * dp + p.d]);
                out.dv.write_f32(out.dv_map.at(seq, j, kh), &first.dv[j * dvp..j * dvp + p.d_v]);
            }
        });
        for (w, parts) in by_pair.into_iter().enumerate() {
            let seq = wave[w].0;
            for (head, i0, dd) in parts.into_iter().flat_map(|pt| pt.delta) {
                for (r, v) in dd.into_iter().enumerate() {
                    delta[p.lse_index(seq, head, i0 + r)] = v;
                }
            }
        }
    }
    delta
}

multiversion!(bwd_task, bwd_task_avx2, bwd_task_avx512, bwd_task_bf16, bwd_task_body, (p: &Problem, pn: &Panels, x: Qkv<'_>, b: &BwdIn<'_>, out: &BwdOut<'_>, seq: usize, kh: usize, c: usize, n: usize) -> BwdPart);

/// One backward task: the query tiles `c, c + n, c + 2n, ...` of every query head of key head `kh`'s group
/// (tiles of [`FBM`] rows, numbered per head), writing their `dQ` and returning their partial `dK`, `dV`
/// and `D`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_task_body<const L: u8>(
    p: &Problem,
    pn: &Panels,
    x: Qkv<'_>,
    b: &BwdIn<'_>,
    out: &BwdOut<'_>,
    seq: usize,
    kh: usize,
    c: usize,
    n: usize,
) -> BwdPart {
    let (d, dp) = (p.d, round_up(p.d, W));
    let (d_v, dvp) = (p.d_v, round_up(p.d_v, W));
    let (sq, sk) = (p.seqlen_q[seq], p.seqlen_k[seq]);
    let nt = sk.div_ceil(BN);
    let mut part = BwdPart { dk: Buf::zeroed(nt * BN * dp), dv: Buf::zeroed(nt * BN * dvp), delta: Vec::new() };
    let mut q = Buf::<f32>::zeroed(FBM * dp);
    let mut g = Buf::<f32>::zeroed(FBM * dvp);
    let mut dq = Buf::<f32>::zeroed(FBM * dp);
    let mut s = Buf::<f32>::zeroed(FBM * BN);
    let mut dpm = Buf::<f32>::zeroed(FBM * BN);
    let mut pm = Buf::<f32>::zeroed(FBM * BN);
    let mut ds = Buf::<f32>::zeroed(FBM * BN);
    let bf = !pn.ktb.is_empty();
    let mut cache = Buf::<f32>::empty();
    let (mut qb, mut gb) = (Buf::<u32>::zeroed(FBM * d.div_ceil(2)), Buf::<u32>::zeroed(FBM * d_v.div_ceil(2)));
    // With bf16 pairs: `dO` in pairs of query rows (`[FBM / 2, dvp]`) for `dV`; `dS` in pairs of keys
    // (`[FBM, BN / 2]`) for `dQ`; `Pᵀ` in pairs of query rows (`[BN, FBM / 2]`).
    let pairs = |n: usize| if bf { n } else { 0 };
    let mut gp = Buf::<u32>::zeroed(pairs(FBM / 2 * dvp));
    let (mut dsb, mut tb) = (Buf::<u32>::zeroed(pairs(FBM * BN / 2)), Buf::<u32>::zeroed(pairs(BN * FBM / 2)));
    let group = p.h / p.hk;
    for head in kh * group..(kh + 1) * group {
        let f = ScoreFn::new(p, seq, head);
        let plain = f.softcap <= 0.0 && f.slope.is_none();
        for i0 in (0..sq).step_by(FBM).skip(c).step_by(n) {
            let i1 = (i0 + FBM).min(sq);
            let bm = i1 - i0;
            let rows = round_up(bm, R);
            q[..rows * dp].fill(0.0);
            g[..rows * dvp].fill(0.0);
            load_rows(x.q, &p.q, seq, head, i0, bm, d, dp, &mut q, p.q_scale(seq, head));
            load_rows(b.dout, b.do_map, seq, head, i0, bm, d_v, dvp, &mut g, 1.0);
            let lse: Vec<f32> = (i0..i1).map(|i| b.lse[p.lse_index(seq, head, i)]).collect();
            // A row that saw no key contributes nothing: its q and dO rows are zeroed so that a non-finite
            // value in them cannot reach dK, dV through the products' zero weights (`0 * NaN`).
            for r in 0..bm {
                if lse[r] == f32::NEG_INFINITY {
                    q[r * dp..(r + 1) * dp].fill(0.0);
                    g[r * dvp..(r + 1) * dvp].fill(0.0);
                }
            }
            let ranges: Vec<_> = (i0..i1).map(|i| p.mask.key_range(i, sq, sk)).collect();
            let (lo, hi) = tile_key_range(p, seq, i0, i1);
            let first = lo - lo % BN;
            // Key tiles of this query tile; whether the D sweep keeps their `S` and `dP` (bit-identical to a
            // recomputation: same kernel, same operands), saving the second sweep two of its five products.
            let nkt = hi.saturating_sub(first).div_ceil(BN);
            let cached = b.delta.is_none() && nkt * 2 * rows * BN <= SCORE_CACHE_FLOATS;
            let qop = rows_op(bf, &q, rows, d, dp, &mut qb);
            let gop = rows_op(bf, &g, rows, d_v, dvp, &mut gb);
            if bf {
                kernel::pack_row_pairs::<false, false>(&g, dvp, rows / 2, dvp, &mut gp, dvp);
            }
            let mut dd = vec![0f32; bm];
            if let Some(given) = b.delta {
                for (r, x) in dd.iter_mut().enumerate() {
                    *x = given[p.lse_index(seq, head, i0 + r)];
                }
            } else {
                // D_i = sum_j P_ij dP_ij over the row's keys; `S` and `dP` kept for the second sweep when they fit.
                if cached {
                    cache.grow(nkt * 2 * rows * BN);
                }
                for (ti, j0) in (first..hi).step_by(BN).enumerate() {
                    let j1 = (j0 + BN).min(sk);
                    let cols = tile_cols(lo.max(j0), hi.min(j1), j0);
                    let (s, dpm) = if cached {
                        cache[ti * 2 * rows * BN..(ti + 1) * 2 * rows * BN].split_at_mut(rows * BN)
                    } else {
                        (&mut s[..], &mut dpm[..])
                    };
                    scores::<L>(p, pn, j0 / BN, rows, qop, gop, cols, s, dpm);
                    for row in tile_rows((i0, j0, j1), &lse, &ranges, s, dpm) {
                        let r = row.r;
                        dd[r] += prob_dot_row::<L>(&f, plain, row, &mut pm);
                    }
                }
            }
            dq[..rows * dp].fill(0.0);
            for (ti, j0) in (first..hi).step_by(BN).enumerate() {
                let j1 = (j0 + BN).min(sk);
                let bn = j1 - j0;
                let t = j0 / BN;
                let k = tile(&pn.k, t, dp);
                let (a, bb) = (lo.max(j0), hi.min(j1));
                let (s, dpm): (&[f32], &[f32]) = if cached {
                    cache[ti * 2 * rows * BN..(ti + 1) * 2 * rows * BN].split_at(rows * BN)
                } else {
                    scores::<L>(p, pn, t, rows, qop, gop, tile_cols(a, bb, j0), &mut s, &mut dpm);
                    (&s, &dpm)
                };
                // Entries no row writes must be 0 for the products: all of them when a row of the tile misses a
                // key of it (a mask, no key, a short last tile), else only the padding rows past `bm`.
                let whole = bn == BN
                    && ranges.iter().zip(&lse).all(|(k, &l)| k.start <= j0 && k.end >= j1 && l != f32::NEG_INFINITY);
                let unwritten = if whole { bm * BN..rows * BN } else { 0..rows * BN };
                pm[unwritten.clone()].fill(0.0);
                ds[unwritten].fill(0.0);
                for row in tile_rows((i0, j0, j1), &lse, &ranges, s, dpm) {
                    let (e, r) = (row.e, row.r);
                    if b.delta.is_some() && b.whole_rows && ranges[r].len() == 1 {
                        dd[r] = prob_dot_row::<L>(&f, plain, row.clone(), &mut pm[e..]);
                    }
                    prob_dscore_row::<L>(&f, plain, row, &mut pm[e..], &mut ds[e..], dd[r]);
                }
                let bnr = round_up(bn, R);
                let (dkt, dvt) = (tile_mut(&mut part.dk, t, dp), tile_mut(&mut part.dv, t, dvp));
                if bf {
                    // `dQ` and `dV` on bf16 pairs: `dS` and `P` rounded to bf16 (as the GPU kernels round them
                    // for their matrix products), `K`, `dO` exact.
                    const RH: usize = FBM / 2;
                    keys_product::<L>(&ds, &mut dsb, k, pn.kp(p, t), dp, &mut dq, rows, |_| a - j0..bb - j0);
                    let r2 = bm.div_ceil(2);
                    kernel::pack_row_pairs::<true, true>(&pm, BN, r2, bnr, &mut tb, RH);
                    gemm_pairs::<L>(&tb, RH, &gp, dvp, dvt, bnr, |_| 0..r2);
                } else {
                    let ka = ARef { a: &ds, rs: BN, cs: 1 };
                    kernel::gemm::<L>(ka, k, dp, &mut dq, dp, rows, |_| a - j0..bb - j0, 0..dp);
                    kernel::gemm::<L>(ARef { a: &pm, rs: 1, cs: BN }, &g, dvp, dvt, dvp, bnr, |_| 0..bm, 0..dvp);
                }
                // `dK = dSᵀ Q` in f32 at every level, bf16 inputs included: a key seen by few query rows sums few
                // products, so nothing averages out a rounding of `dS`, whose grid (scaled) differs from the
                // baseline's (unscaled, after a rounded `dP`); rounded, it read up to 3.0x the baseline's error on
                // the spec's (3, 799) shape (docs/notes/cpu.md).
                kernel::gemm::<L>(ARef { a: &ds, rs: 1, cs: BN }, &q, dp, dkt, dp, bnr, |_| 0..bm, 0..dp);
            }
            for r in 0..bm {
                if lse[r] == f32::NEG_INFINITY {
                    // A row that saw no key has zero gradient, whatever the (unweighted) keys of its tiles hold.
                    dq[r * dp..r * dp + d].fill(0.0);
                }
                out.dq.write_f32(out.dq_map.at(seq, i0 + r, head), &dq[r * dp..r * dp + d]);
            }
            part.delta.push((head, i0, dd));
        }
    }
    if n == 1 {
        // The pair's only task: its partials are the pair's dK, dV; written now and dropped, so that a wave holds
        // one pair's partials per running task, not every pair's until the wave ends.
        for j in 0..sk {
            out.dk.write_f32(out.dk_map.at(seq, j, kh), &part.dk[j * dp..j * dp + d]);
            out.dv.write_f32(out.dv_map.at(seq, j, kh), &part.dv[j * dvp..j * dvp + d_v]);
        }
        part.dk = Buf::empty();
        part.dv = Buf::empty();
    }
    part
}

/// The plain rows of [`prob_dscore_row`] with AVX-512F ([`kernel::exp_softmax_avx512`]), 16 keys per step, the
/// last partial step masked.
///
/// # Safety
/// The CPU supports AVX-512F; `dp`, `pm` and `ds` are at least as long as `qk`.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
unsafe fn prob_dscore_plain_avx512(
    qk: &[f32],
    dp: &[f32],
    pm: &mut [f32],
    ds: &mut [f32],
    scale: f32,
    lse: f32,
    di: f32,
) {
    use std::arch::x86_64::*;
    let n = qk.len();
    assert!(dp.len() >= n && pm.len() >= n && ds.len() >= n);
    let (sc, ls, dv) = (_mm512_set1_ps(scale), _mm512_set1_ps(lse), _mm512_set1_ps(di));
    let mut e = 0;
    while e < n {
        let k = tail_mask(n - e);
        let x = _mm512_maskz_loadu_ps(k, qk.as_ptr().add(e));
        let p = kernel::exp_softmax_avx512(_mm512_sub_ps(_mm512_mul_ps(x, sc), ls));
        let g = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp.as_ptr().add(e)), dv);
        _mm512_mask_storeu_ps(pm.as_mut_ptr().add(e), k, p);
        _mm512_mask_storeu_ps(ds.as_mut_ptr().add(e), k, _mm512_mul_ps(_mm512_mul_ps(p, g), sc));
        e += LANES;
    }
}

/// `sum_e exp(x[e]) y[e]` with [`kernel::exp_softmax_avx512`] (the exponential of the level's `P` everywhere else),
/// in 16 partial sums combined by [`lane_sum`]; the last partial step masked.
///
/// # Safety
/// The CPU supports AVX-512F; `y` is at least as long as `x`.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
unsafe fn exp_dot_avx512(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    assert!(y.len() >= n);
    let mut acc = _mm512_setzero_ps();
    let mut e = 0;
    while e < n {
        let k = tail_mask(n - e);
        let p = kernel::exp_softmax_avx512(_mm512_maskz_loadu_ps(k, x.as_ptr().add(e)));
        acc = _mm512_mask_add_ps(acc, k, acc, _mm512_mul_ps(p, _mm512_maskz_loadu_ps(k, y.as_ptr().add(e))));
        e += LANES;
    }
    let mut lanes = [0f32; LANES];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    lane_sum(lanes)
}

/// `sum_j P_ij dP_ij` over the keys of `row`, with `P_ij = exp(s - lse)` (`pm` is scratch of at least
/// `row.js.len()`), in [`LANES`] partial sums.
#[inline(always)]
fn prob_dot_row<const L: u8>(f: &ScoreFn, plain: bool, row: TileRow<'_>, pm: &mut [f32]) -> f32 {
    let TileRow { i, js, lse, .. } = row;
    let n = js.len();
    let (qk, dp, pm) = (&row.qk[..n], &row.dp[..n], &mut pm[..n]);
    if plain {
        pm.iter_mut().zip(qk).for_each(|(x, &v)| *x = v * f.scale - lse);
    } else {
        for ((x, &v), j) in pm.iter_mut().zip(qk).zip(js) {
            *x = f.apply(v, i, j).0 - lse;
        }
    }
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    if L >= 2 {
        // SAFETY: level 2 or more: the CPU has AVX-512F; `dp` is as long as `pm`.
        return unsafe { exp_dot_avx512(pm, dp) };
    }
    let mut acc = [0f32; LANES];
    let mut ch = pm.chunks_exact(LANES).zip(dp.chunks_exact(LANES));
    for (x, y) in &mut ch {
        for l in 0..LANES {
            acc[l] += kernel::exp_softmax(x[l]) * y[l];
        }
    }
    let full = n - n % LANES;
    let mut tail = 0f32;
    for e in full..n {
        tail += kernel::exp_softmax(pm[e]) * dp[e];
    }
    lane_sum(acc) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waves stay within the budget, keep the items' order, take as few waves as filling them would, and share
    /// the items evenly: 8 equal pairs where 5 fit a wave go 4 and 4 (a greedy fill would go 5 and 3).
    #[test]
    fn waves_are_even_and_within_budget() {
        let w = even_waves((0..8).map(|i| (i, 25)).collect(), 128);
        assert_eq!(w, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(even_waves((0..3).map(|i| (i, 200)).collect(), 128), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(even_waves(vec![(0, 10), (1, 10)], 128), vec![vec![0, 1]]);
        assert_eq!(even_waves(Vec::<(u8, usize)>::new(), 128), vec![Vec::<u8>::new()]);
        for seed in 0..200u64 {
            let sizes: Vec<usize> = (0..1 + seed % 13).map(|i| 1 + ((seed * 31 + i * 17) % 97) as usize).collect();
            let budget = 40 + (seed % 60) as usize;
            let w = even_waves(sizes.iter().copied().enumerate().collect(), budget);
            let mut greedy = 1;
            let mut acc = 0;
            for (i, &b) in sizes.iter().enumerate() {
                if i > 0 && acc + b > budget {
                    greedy += 1;
                    acc = 0;
                }
                acc += b;
            }
            let flat: Vec<usize> = w.iter().flatten().copied().collect();
            assert_eq!(flat, (0..sizes.len()).collect::<Vec<_>>(), "seed {seed}: order");
            for wave in &w {
                assert!(!wave.is_empty(), "seed {seed}: empty wave");
                let b: usize = wave.iter().map(|&i| sizes[i]).sum();
                assert!(wave.len() == 1 || b <= budget, "seed {seed}: wave of {b} bytes over {budget}");
            }
            assert!(w.len() <= greedy + 1, "seed {seed}: {} waves, greedy {greedy}", w.len());
        }
    }

    /// `pack_tile_pairs` against its definition: `out[kk * BN + j]` = rows `2kk` (low half) and `2kk + 1` (high
    /// half, 0 past row `d`) of column `j`, truncated to bf16.
    #[test]
    fn tile_pairs_follow_their_definition() {
        for d in [1usize, 2, 5, 64, 67] {
            let tt: Vec<f32> = (0..d * BN).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let mut out = vec![u32::MAX; d.div_ceil(2) * BN];
            pack_tile_pairs(&tt, d, &mut out);
            for kk in 0..d.div_ceil(2) {
                for j in 0..BN {
                    let lo = tt[2 * kk * BN + j].to_bits() >> 16;
                    let hi = if 2 * kk + 1 < d { tt[(2 * kk + 1) * BN + j].to_bits() >> 16 } else { 0 };
                    assert_eq!(out[kk * BN + j], lo | (hi << 16), "d {d} pair {kk} column {j}");
                }
            }
        }
    }
}
