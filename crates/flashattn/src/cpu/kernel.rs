//! The tile products and exponentials of the CPU flash backend, with run-time dispatch across instruction
//! sets. Independent of `crate::gemm` (the oracle's and the naive baseline's products), so the accuracy
//! rule compares this kernel against code that does not share it.
//!
//! Every product is `C[i, n] += sum_k A[i, k] B[k, n]` with `B` row-major and `A` read by rows or by
//! columns ([`ARef`]). A register tile of `R` rows by `W` columns of `C` is held in accumulators while `k`
//! runs over the whole of the row group's range in increasing order, one fused (or, on the plain copy,
//! unfused) multiply-add per step: each element of `C` is one chain `c + a_0 b_0 + a_1 b_1 + ...` whatever
//! the register tile's shape, so a product's result depends only on the instruction set ([`Level`]), never
//! on how many rows a call has. That keeps a score `S_ij` bit-identical across the forward and both
//! backward passes even where they tile the queries differently.
//!
//! Levels: 0, plain (no fused multiply-add); 1, AVX2+FMA (`R = 4`, `W = 16`, two `ymm` per row); 2,
//! AVX-512F (`R = 8`, `W = 32`, two `zmm` per row, 16 accumulators); 3, level 2 plus [`gemm_bf16`] (AVX-512-BF16
//! `vdpbf16ps`, two products per lane and instruction) for every product of bf16 inputs (the probabilities and
//! score gradients rounded to bf16 for theirs, as the spec's baseline rounds `p`). Callers pad rows to [`RMAX`] and
//! column ranges to [`WP`], which every level's `R` and `W` divide.

use std::ops::Range;

/// Rows are padded to a multiple of this (every level's register-tile height divides it).
pub(crate) const RMAX: usize = 8;
/// Column ranges and padded widths are multiples of this (every level's register-tile width divides it).
pub(crate) const WP: usize = 32;

/// The widest instruction set the CPU backend may use ([`set_simd_cap`]); 3 = no cap.
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(3);

/// Caps the instruction set the CPU backend runs with: 3 AVX-512F and AVX-512-BF16 (no cap), 2 AVX-512F, 1
/// AVX2+FMA, 0 plain. A cap above
/// what the machine has changes nothing. For comparisons and for testing every copy on one machine; results
/// depend on the level (each level is deterministic on its own).
pub(crate) fn set_simd_cap(level: u8) {
    CAP.store(level.min(3), std::sync::atomic::Ordering::Relaxed);
}

/// The instruction set the hot loops run with: 0 plain, 1 AVX2+FMA, 2 AVX-512F (+AVX2+FMA), 3 AVX-512F and
/// AVX-512-BF16.
pub(crate) fn level() -> u8 {
    detected().min(CAP.load(std::sync::atomic::Ordering::Relaxed))
}

/// The widest instruction set this machine and build offer.
fn detected() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        static L: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        *L.get_or_init(|| {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && cfg!(flashattn_avx512) && is_x86_feature_detected!("avx512f") {
                if is_x86_feature_detected!("avx512bf16") {
                    3
                } else {
                    2
                }
            } else if avx2 {
                1
            } else {
                0
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// How `A` is read: `A[i, k] = a[i * rs + k * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct ARef<'a> {
    pub a: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// The matrices of a [`gemm`] call: `A` (see [`ARef`]), `B` of row stride `ldb` and `C` of row stride `ldc`.
struct Operands<'a> {
    a: ARef<'a>,
    b: &'a [f32],
    ldb: usize,
    c: &'a mut [f32],
    ldc: usize,
}

/// `C[i, n] += sum_{k in kr(i0)} A[i, k] B[k, n]` for rows `0..rows` (a multiple of [`RMAX`]) in groups of the
/// level's `R` rows starting at `i0`, and `n` in `cr` (aligned to [`WP`], within `ldb` and `ldc`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<const L: u8>(
    a: ARef<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    kr: impl Fn(usize) -> Range<usize>,
    cr: Range<usize>,
) {
    gemm_into::<L, true>(a, b, ldb, c, ldc, rows, kr, cr);
}

/// [`gemm`] with `ACC`; without it `=` instead of `+=`: `C[i, n] = sum_{k in kr(i0)} A[i, k] B[k, n]` for the
/// same rows and columns (0 where `kr` is empty), what `C` held there neither read nor kept, the rest of `C`
/// untouched: the same values as zeroing those elements and accumulating, without the pass that zeroes them and
/// the accumulators' loads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<const L: u8, const ACC: bool>(
    a: ARef<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    kr: impl Fn(usize) -> Range<usize>,
    cr: Range<usize>,
) {
    let m = Operands { a, b, ldb, c, ldc };
    if L >= 2 {
        #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
        {
            gemm_impl::<8, 32, L, ACC>(m, rows, kr, cr);
            return;
        }
    }
    gemm_impl::<4, 16, L, ACC>(m, rows, kr, cr);
}

/// [`gemm_into`] in `RR x WW` register tiles.
#[inline(always)]
fn gemm_impl<const RR: usize, const WW: usize, const L: u8, const ACC: bool>(
    mut m: Operands<'_>,
    rows: usize,
    kr: impl Fn(usize) -> Range<usize>,
    cr: Range<usize>,
) {
    if cr.is_empty() || rows == 0 {
        return;
    }
    let (a, b, ldb, ldc) = (m.a, m.b, m.ldb, m.ldc);
    assert!(rows % RR == 0 && cr.start % WW == 0 && cr.end % WW == 0);
    assert!(cr.end <= ldb && cr.end <= ldc);
    assert!((rows - 1) * ldc + cr.end <= m.c.len());
    for n0 in cr.step_by(WW) {
        for i0 in (0..rows).step_by(RR) {
            let k = kr(i0);
            if k.is_empty() {
                if !ACC {
                    for r in i0..i0 + RR {
                        m.c[r * ldc + n0..r * ldc + n0 + WW].fill(0.0);
                    }
                }
                continue;
            }
            // Every access of the tile lies within these bounds.
            assert!((i0 + RR - 1) * a.rs + (k.end - 1) * a.cs < a.a.len());
            assert!((k.end - 1) * ldb + n0 + WW <= b.len());
            // SAFETY: the asserts above bound every read of `a` and `b` and every write of `c`.
            unsafe {
                #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
                if L >= 2 && RR == 8 && WW == 32 {
                    tile_avx512::<ACC>(&mut m, i0, k, n0);
                    continue;
                }
                tile::<RR, WW, L, ACC>(&mut m, i0, k, n0);
            }
        }
    }
}

/// One `RR x WW` register tile: `C[i0.., n0..] += A[i0.., k] B[k, n0..]` (`=` without `ACC`), written for the
/// compiler to vectorise (fused multiply-adds when `L >= 1`).
///
/// # Safety
/// With `m`'s `a`, `b`, `ldb`, `c`, `ldc`: `(i0 + RR - 1) * a.rs + (k.end - 1) * a.cs < a.a.len()`,
/// `(k.end - 1) * ldb + n0 + WW <= b.len()` and `(i0 + RR - 1) * ldc + n0 + WW <= c.len()`.
#[inline(always)]
unsafe fn tile<const RR: usize, const WW: usize, const L: u8, const ACC: bool>(
    m: &mut Operands<'_>,
    i0: usize,
    k: Range<usize>,
    n0: usize,
) {
    let (a, b, ldb, ldc) = (m.a, m.b, m.ldb, m.ldc);
    let cp = m.c.as_mut_ptr();
    let mut acc = [[0f32; WW]; RR];
    if ACC {
        for (r, row) in acc.iter_mut().enumerate() {
            *row = *(cp.add((i0 + r) * ldc + n0) as *const [f32; WW]);
        }
    }
    let (ap, bp) = (a.a.as_ptr(), b.as_ptr());
    for kk in k {
        let brow = &*(bp.add(kk * ldb + n0) as *const [f32; WW]);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = *ap.add((i0 + r) * a.rs + kk * a.cs);
            for l in 0..WW {
                row[l] = if L >= 1 { av.mul_add(brow[l], row[l]) } else { av * brow[l] + row[l] };
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        *(cp.add((i0 + r) * ldc + n0) as *mut [f32; WW]) = *row;
    }
}

/// Invokes the macro `$m` for each of the 8 accumulator rows of the AVX-512 micro-kernels, unrolled.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
macro_rules! rows {
    ($m:ident) => {
        $m!(0);
        $m!(1);
        $m!(2);
        $m!(3);
        $m!(4);
        $m!(5);
        $m!(6);
        $m!(7);
    };
}

/// The AVX-512 register tile: 8 rows by 32 columns, 16 `zmm` accumulators, one broadcast of `A[i, k]` per
/// row and two loads of `B[k, n0..n0 + 32]` per step of `k`. Same chain per element as [`tile`] with fused
/// multiply-adds.
///
/// # Safety
/// As [`tile`] with `RR = 8`, `WW = 32`; the CPU supports AVX-512F (callers run at level 2 only).
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
unsafe fn tile_avx512<const ACC: bool>(m: &mut Operands<'_>, i0: usize, k: Range<usize>, n0: usize) {
    use std::arch::x86_64::*;
    let (a, b, ldb, ldc) = (m.a, m.b, m.ldb, m.ldc);
    let cp = m.c.as_mut_ptr();
    let (ap, bp) = (a.a.as_ptr(), b.as_ptr());
    let mut c0 = [_mm512_setzero_ps(); 8];
    let mut c1 = [_mm512_setzero_ps(); 8];
    macro_rules! ld {
        ($r:expr) => {
            c0[$r] = _mm512_loadu_ps(cp.add((i0 + $r) * ldc + n0));
            c1[$r] = _mm512_loadu_ps(cp.add((i0 + $r) * ldc + n0 + 16));
        };
    }
    if ACC {
        rows!(ld);
    }
    let arow = ap.add(i0 * a.rs);
    for kk in k {
        let b0 = _mm512_loadu_ps(bp.add(kk * ldb + n0));
        let b1 = _mm512_loadu_ps(bp.add(kk * ldb + n0 + 16));
        let ak = arow.add(kk * a.cs);
        macro_rules! step {
            ($r:expr) => {
                let av = _mm512_set1_ps(*ak.add($r * a.rs));
                c0[$r] = _mm512_fmadd_ps(av, b0, c0[$r]);
                c1[$r] = _mm512_fmadd_ps(av, b1, c1[$r]);
            };
        }
        rows!(step);
    }
    store_rows_avx512(cp, ldc, i0, n0, &c0, &c1);
}

/// Stores the accumulators of an AVX-512 register tile into `C` (`cp`, row stride `ldc`): row `i0 + r` gets
/// `c0[r]` at columns `n0..n0 + 16` and `c1[r]` at `n0 + 16..n0 + 32`.
///
/// # Safety
/// `(i0 + 7) * ldc + n0 + 32` elements of `cp` are writable; the CPU supports AVX-512F.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
unsafe fn store_rows_avx512(
    cp: *mut f32,
    ldc: usize,
    i0: usize,
    n0: usize,
    c0: &[std::arch::x86_64::__m512; 8],
    c1: &[std::arch::x86_64::__m512; 8],
) {
    use std::arch::x86_64::*;
    macro_rules! st {
        ($r:expr) => {
            _mm512_storeu_ps(cp.add((i0 + $r) * ldc + n0), c0[$r]);
            _mm512_storeu_ps(cp.add((i0 + $r) * ldc + n0 + 16), c1[$r]);
        };
    }
    rows!(st);
}

/// `C[i, n] (+)= sum_{kk in kr(i0)} A[i, 2kk] B[2kk, n] + A[i, 2kk + 1] B[2kk + 1, n]` for bf16 operands stored in
/// pairs: `a[i * lda + kk]` holds `A[i, 2kk]` (low half) and `A[i, 2kk + 1]` (high half), `b[kk * ldb + n]` holds
/// `B[2kk, n]` and `B[2kk + 1, n]`; `C` is overwritten, or added to with `ACC`. Rows `0..rows` (a multiple of
/// [`RMAX`]) in groups of 8 starting at `i0`, each over its pair range `kr(i0)`; columns `cr` (aligned to [`WP`],
/// within `ldb` and `ldc`). Products of bf16 numbers are exact in f32, so this is the f32 product's accuracy at
/// twice its rate: `vdpbf16ps` adds both products of a pair to each `f32` lane (inputs and outputs below the
/// smallest normal are flushed to zero). Level 3 only.
///
/// # Safety
/// The CPU supports AVX-512F and AVX-512-BF16 ([`level`] is 3).
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn gemm_bf16<const ACC: bool>(
    a: &[u32],
    lda: usize,
    b: &[u32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    kr: impl Fn(usize) -> Range<usize>,
    cr: Range<usize>,
) {
    if cr.is_empty() || rows == 0 {
        return;
    }
    assert!(rows % 8 == 0 && cr.start % 32 == 0 && cr.end % 32 == 0);
    assert!(cr.end <= ldb && cr.end <= ldc);
    assert!((rows - 1) * ldc + cr.end <= c.len());
    for n0 in cr.step_by(32) {
        for i0 in (0..rows).step_by(8) {
            let k = kr(i0);
            if k.is_empty() {
                if !ACC {
                    for r in i0..i0 + 8 {
                        c[r * ldc + n0..r * ldc + n0 + 32].fill(0.0);
                    }
                }
                continue;
            }
            // Every access of the tile lies within these bounds.
            assert!((i0 + 7) * lda + k.end <= a.len());
            assert!((k.end - 1) * ldb + n0 + 32 <= b.len());
            // SAFETY: the asserts above bound every read of `a` and `b` and every write of `c`; the caller
            // guarantees the CPU features.
            unsafe { tile_bf16::<ACC>(a, lda, i0, k, b, ldb, n0, c, ldc) };
        }
    }
}

/// One 8 x 32 tile of [`gemm_bf16`]: 16 `zmm` accumulators (loaded from `C` with `ACC`), per pair `kk` two
/// loads of `B` and one 32-bit broadcast of `A` (a pair) per row.
///
/// # Safety
/// `(i0 + 7) * lda + k.end <= a.len()`, `(k.end - 1) * ldb + n0 + 32 <= b.len()`,
/// `(i0 + 7) * ldc + n0 + 32 <= c.len()`; the CPU supports AVX-512F and AVX-512-BF16.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16<const ACC: bool>(
    a: &[u32],
    lda: usize,
    i0: usize,
    k: Range<usize>,
    b: &[u32],
    ldb: usize,
    n0: usize,
    c: &mut [f32],
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let (ap, bp, cp) = (a.as_ptr().add(i0 * lda), b.as_ptr(), c.as_mut_ptr());
    let mut c0 = [_mm512_setzero_ps(); 8];
    let mut c1 = [_mm512_setzero_ps(); 8];
    if ACC {
        macro_rules! ld {
            ($r:expr) => {
                c0[$r] = _mm512_loadu_ps(cp.add((i0 + $r) * ldc + n0));
                c1[$r] = _mm512_loadu_ps(cp.add((i0 + $r) * ldc + n0 + 16));
            };
        }
        rows!(ld);
    }
    for kk in k {
        // SAFETY (transmute): `__m512i` and `__m512bh` are both 512 bits of plain data.
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(kk * ldb + n0) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(kk * ldb + n0 + 16) as *const _));
        macro_rules! step {
            ($r:expr) => {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add($r * lda + kk) as i32));
                c0[$r] = _mm512_dpbf16_ps(c0[$r], av, b0);
                c1[$r] = _mm512_dpbf16_ps(c1[$r], av, b1);
            };
        }
        rows!(step);
    }
    store_rows_avx512(cp, ldc, i0, n0, &c0, &c1);
}

/// Packs `n` values of `f32` that are exactly bf16 (converted from bf16 inputs) into pairs for [`gemm_bf16`]:
/// `out[kk] = bf16(x[2kk]) | bf16(x[2kk + 1]) << 16`, the missing last element of an odd `n` as 0; the bf16 of
/// such a value is the top half of its bits (exact, no rounding).
#[inline(always)]
pub(crate) fn pack_pairs(x: &[f32], n: usize, out: &mut [u32]) {
    let n2 = n / 2;
    for (o, p) in out[..n2].iter_mut().zip(x[..2 * n2].chunks_exact(2)) {
        *o = (p[0].to_bits() >> 16) | (p[1].to_bits() & 0xffff_0000);
    }
    if n % 2 == 1 {
        out[n2] = x[n - 1].to_bits() >> 16;
    }
}

/// The bf16 of `x` rounded to nearest, ties to even, in the low 16 bits (NaN stays a quiet NaN of the same
/// sign; torch's conversion).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let u = x.to_bits();
    if x.is_nan() {
        (u >> 16) | 0x40
    } else {
        (u + 0x7fff + ((u >> 16) & 1)) >> 16
    }
}

/// Packs rows of computed `f32` values (probabilities, score gradients) into bf16 pairs along the row, rounded
/// ([`bf16_bits`]): `out[r * ldo + kk] = bf16(x[r * ld + 2kk]) | bf16(x[r * ld + 2kk + 1]) << 16` for rows
/// `0..rows` and pairs `kk` in `pairs`.
#[inline(always)]
pub(crate) fn pack_rows_rounded(x: &[f32], ld: usize, rows: usize, pairs: Range<usize>, out: &mut [u32], ldo: usize) {
    for r in 0..rows {
        let src = &x[r * ld + 2 * pairs.start..r * ld + 2 * pairs.end];
        let dst = &mut out[r * ldo + pairs.start..r * ldo + pairs.end];
        for (o, p) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *o = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
        }
    }
}

/// Packs pairs of rows of `x` (`ld` apart) column by column into bf16 pairs: `out[rr * ldo + n]` holds
/// `x[2rr, n]` (low half) and `x[2rr + 1, n]` for `rr < rows2`, `n < cols`. `ROUND`: rounded ([`bf16_bits`]),
/// for computed values; otherwise the values must be exactly bf16 (converted from bf16 inputs) and their top
/// halves are taken. `TRANSPOSE`: stored as `out[n * ldo + rr]` instead (the transposed operand of a product
/// that reduces over the rows of `x`).
#[inline(always)]
pub(crate) fn pack_row_pairs<const ROUND: bool, const TRANSPOSE: bool>(
    x: &[f32],
    ld: usize,
    rows2: usize,
    cols: usize,
    out: &mut [u32],
    ldo: usize,
) {
    let bits = |v: f32| if ROUND { bf16_bits(v) } else { v.to_bits() >> 16 };
    for rr in 0..rows2 {
        let (lo, hi) = (&x[2 * rr * ld..2 * rr * ld + cols], &x[(2 * rr + 1) * ld..(2 * rr + 1) * ld + cols]);
        if TRANSPOSE {
            for (n, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                out[n * ldo + rr] = bits(l) | (bits(h) << 16);
            }
        } else {
            for ((o, &l), &h) in out[rr * ldo..rr * ldo + cols].iter_mut().zip(lo).zip(hi) {
                *o = bits(l) | (bits(h) << 16);
            }
        }
    }
}

/// The two factors of `e^x = 2^n e^r` for `x` already clamped to `[-87.5, 88.75]`: `n = round(x log2 e)` as an
/// integer and `e^r`, `r = x - n ln 2` (in two parts, exact), by a degree-6 minimax polynomial on
/// `|r| <= ln 2 / 2` (relative error 3e-9 before rounding; `e^0 = 1` exactly).
#[inline(always)]
fn exp_parts(xc: f32) -> (i32, f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to the nearest integer
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.381_451_8e-3_f32;
    p = p * r + 8.368_747e-3;
    p = p * r + 4.166_839_3e-2;
    p = p * r + 1.666_652e-1;
    p = p * r + 0.499_999_94;
    // `n` as an integer, read from the bits of `t` (`1.5 * 2^23 + n`, whose last mantissa bits are `n`): the
    // same value as `n as i32`, but an integer subtraction the compiler vectorises (the saturating `as`
    // conversion is not). For a NaN `x` the value is garbage but bounded; callers do not use it then.
    ((t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32), (p * r * r + r) + 1.0)
}

/// `2^n` for `n` in `[-126, 127]`, from its exponent field.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `x = e^x` (vectorisable in a loop), by [`exp_parts`] (about 1 ulp). `e^0 = 1` exactly, `-inf` and anything
/// below the smallest normal's logarithm give 0 (subnormal results are flushed), `+inf` and anything above
/// `ln(f32::MAX)` give `+inf`, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    let (n, e) = exp_parts(x.clamp(-87.5, 88.75));
    // 2^n for n in [-127, 128] as two normal halves, so the product is exact up to the final rounding.
    let h = n >> 1;
    let y = e * pow2(h) * pow2(n - h);
    if x < -87.33 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `e^x` for the softmax's exponentials, whose arguments are at most a rounding error above 0 (a score minus its
/// row's running maximum); vectorisable in a loop. [`exp_parts`] with one scale factor `2^n`, normal for every
/// `n` the clamp allows (`[-126, 127]`). Below the smallest normal's logarithm (and `-inf`): 0; NaN stays NaN.
/// Defined for `x <= 88` (above, the clamp gives `e^88`).
#[inline(always)]
pub(crate) fn exp_softmax(x: f32) -> f32 {
    const MIN: f32 = -87.33; // e^MIN is just above the smallest normal
    let (n, e) = exp_parts(x.clamp(MIN, 88.0));
    let y = e * pow2(n);
    if x < MIN {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// [`exp_softmax`] on 16 lanes with AVX-512F: the same reduction and polynomial with fused multiply-adds, and
/// `2^n` applied by `vscalefps`, about 14 vector operations where the portable loop compiles to about 30. Same
/// special values (0 below the smallest normal's logarithm and for `-inf`, NaN stays NaN, `e^0 = 1` exactly);
/// within 2 ulp of `e^x` like it, but not bit-identical to it. Defined for `x <= 88` (the softmax's arguments
/// are at most a rounding above 0); above about 88.7 it gives `+inf` where [`exp_softmax`] clamps to `e^88`.
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(all(target_arch = "x86_64", flashattn_avx512))]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)] // compiled only by Rust >= 1.89 (`flashattn_avx512`, see build.rs)
pub(crate) unsafe fn exp_softmax_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const MIN: f32 = -87.33;
    const ROUND: f32 = 12_582_912.0;
    let s = _mm512_set1_ps;
    // `max(MIN, x)` returns `x` when `x` is NaN (the second operand), so NaN runs through to the result.
    let xc = _mm512_max_ps(s(MIN), x);
    let t = _mm512_fmadd_ps(xc, s(std::f32::consts::LOG2_E), s(ROUND));
    let n = _mm512_sub_ps(t, s(ROUND));
    let r = _mm512_fnmadd_ps(n, s(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, s(-2.121_944_4e-4), r);
    let mut p = _mm512_fmadd_ps(s(1.381_451_8e-3), r, s(8.368_747e-3));
    p = _mm512_fmadd_ps(p, r, s(4.166_839_3e-2));
    p = _mm512_fmadd_ps(p, r, s(1.666_652e-1));
    p = _mm512_fmadd_ps(p, r, s(0.499_999_94));
    let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), s(1.0));
    // Lanes below MIN (and -inf) are zeroed; NaN compares unordered, "not less than" is true, the lane stays.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, s(MIN));
    _mm512_maskz_scalef_ps(keep, e, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest relative error of `f` against `f64`'s `exp` at `lo, lo + step, ...` below `hi`, and at `extra`.
    fn worst_relative_error(f: fn(f32) -> f32, lo: f32, hi: f32, step: f32, extra: &[f32]) -> f64 {
        let err = |x: f32| {
            let want = (x as f64).exp();
            ((f(x) as f64 - want) / want).abs()
        };
        let mut worst = extra.iter().map(|&x| err(x)).fold(0f64, f64::max);
        let mut x = lo;
        while x < hi {
            worst = worst.max(err(x));
            x += step;
        }
        worst
    }

    #[test]
    fn exp_matches_libm() {
        let worst = worst_relative_error(exp1, -87.3, 88.7, 0.0137, &[]);
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert_eq!(exp1(0.0), 1.0);
        assert_eq!(exp1(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp1(-1000.0), 0.0);
        assert_eq!(exp1(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp1(100.0), f32::INFINITY);
        assert!(exp1(f32::NAN).is_nan());
    }

    /// The softmax exponential's contract ([`exp_softmax`] and its AVX-512 form): within 2 ulp of f64's `exp` on
    /// `[-87.33, 2]`, `e^0 = 1` exactly, 0 below the smallest normal's logarithm and for `-inf`, NaN stays NaN.
    fn check_softmax_exp(f: fn(f32) -> f32) {
        let extra = [0.0f32, -1e-30, 1e-7, -0.346_573_6, 0.346_573_6, -87.0, 88.0];
        let worst = worst_relative_error(f, -87.33, 2.0, 0.000_917, &extra);
        assert!(worst < 2.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert_eq!(f(0.0), 1.0);
        assert_eq!(f(f32::NEG_INFINITY), 0.0);
        assert_eq!(f(-87.34), 0.0);
        assert_eq!(f(-1000.0), 0.0);
        assert!(f(f32::NAN).is_nan());
        assert!(f(-87.33) > 0.0 && f(-87.33).is_normal());
    }

    #[test]
    fn exp_softmax_matches_libm() {
        check_softmax_exp(exp_softmax);
    }

    /// The AVX-512 exponential against f64 on the grid of [`exp_softmax_matches_libm`], and its special values.
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    #[test]
    fn exp_softmax_avx512_matches_libm() {
        if level() < 2 {
            return;
        }
        fn lane(x: f32) -> f32 {
            let mut out = [0f32; 16];
            // SAFETY: level 2 or more: the CPU has AVX-512F; `out` holds 16 floats.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(out.as_mut_ptr(), exp_softmax_avx512(_mm512_set1_ps(x)));
            }
            assert!(out.iter().all(|v| v.to_bits() == out[0].to_bits()), "lanes differ at {x}: {out:?}");
            out[0]
        }
        check_softmax_exp(lane);
    }

    fn check<const L: u8>() {
        let (rows, kk, n) = (16, 37, 64);
        let a: Vec<f32> = (0..rows * kk).map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0).collect();
        let b: Vec<f32> = (0..kk * n).map(|i| ((i * 104729) % 89) as f32 / 40.0 - 1.0).collect();
        let mut c = vec![0.5f32; rows * n];
        gemm::<L>(ARef { a: &a, rs: kk, cs: 1 }, &b, n, &mut c, n, rows, |_| 0..kk, 0..n);
        for i in 0..rows {
            for j in 0..n {
                let want: f64 = 0.5 + (0..kk).map(|t| a[i * kk + t] as f64 * b[t * n + j] as f64).sum::<f64>();
                assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "L={L} ({i},{j})");
            }
        }
    }

    /// `gemm_bf16` on bf16 values (exact in f32) against f64, odd depth (a half-empty last pair).
    #[cfg(all(target_arch = "x86_64", flashattn_avx512))]
    #[test]
    fn gemm_bf16_agrees_with_f64() {
        if level() < 3 {
            return;
        }
        let (rows, kk, n) = (16usize, 37usize, 64usize);
        let bf = |x: f32| f32::from_bits(x.to_bits() & 0xffff_0000);
        let a: Vec<f32> = (0..rows * kk).map(|i| bf(((i * 7919) % 97) as f32 / 50.0 - 1.0)).collect();
        let b: Vec<f32> = (0..kk * n).map(|i| bf(((i * 104729) % 89) as f32 / 40.0 - 1.0)).collect();
        let k2 = kk.div_ceil(2);
        let mut ap = vec![0u32; rows * k2];
        for i in 0..rows {
            pack_pairs(&a[i * kk..(i + 1) * kk], kk, &mut ap[i * k2..(i + 1) * k2]);
        }
        let mut bp = vec![0u32; k2 * n];
        for t in 0..k2 {
            for j in 0..n {
                let col = [b[2 * t * n + j], if 2 * t + 1 < kk { b[(2 * t + 1) * n + j] } else { 0.0 }];
                pack_pairs(&col, 2, &mut bp[t * n + j..t * n + j + 1]);
            }
        }
        let mut c = vec![f32::NAN; rows * n];
        // SAFETY: level 3: the CPU has AVX-512F and AVX-512-BF16.
        unsafe { gemm_bf16::<false>(&ap, k2, &bp, n, &mut c, n, rows, |_| 0..k2, 0..n) };
        for i in 0..rows {
            for j in 0..n {
                let want: f64 = (0..kk).map(|t| a[i * kk + t] as f64 * b[t * n + j] as f64).sum();
                assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "({i},{j}) {} vs {want}", c[i * n + j]);
            }
        }
        // Accumulating, each 8-row group over its own pair range (the second group's empty: unchanged).
        let before = c.clone();
        let kr = |i0: usize| if i0 == 0 { 3..11 } else { 5..5 };
        // SAFETY: as above.
        unsafe { gemm_bf16::<true>(&ap, k2, &bp, n, &mut c, n, rows, kr, 0..n) };
        for i in 0..rows {
            for j in 0..n {
                let ks = kr(i - i % 8);
                let add: f64 =
                    (2 * ks.start..(2 * ks.end).min(kk)).map(|t| a[i * kk + t] as f64 * b[t * n + j] as f64).sum();
                let want = before[i * n + j] as f64 + add;
                assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "acc ({i},{j}) {} vs {want}", c[i * n + j]);
            }
        }
    }

    #[test]
    fn bf16_rounding_and_packing() {
        for x in
            [0.0f32, -0.0, 1.0, 1.003_906_3, 1.011_718_8, 2.718_3e5, -2.7e-3, 1e-39, 3.0e38, f32::INFINITY, f32::MAX]
        {
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits() as u32, "{x}");
        }
        // Ties to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32::from_bits(bf16_bits(f32::NAN) << 16).is_nan());
        assert!(f32::from_bits(bf16_bits(-f32::NAN) << 16).is_sign_negative());
        // Row pairs, plain and transposed, rounded and exact.
        let x: Vec<f32> = (0..4 * 6).map(|i| 1.0 + i as f32 / 64.0).collect();
        let (mut o, mut t) = (vec![0u32; 2 * 6], vec![0u32; 6 * 2]);
        pack_row_pairs::<true, false>(&x, 6, 2, 6, &mut o, 6);
        pack_row_pairs::<true, true>(&x, 6, 2, 6, &mut t, 2);
        for rr in 0..2 {
            for n in 0..6 {
                let want = bf16_bits(x[2 * rr * 6 + n]) | (bf16_bits(x[(2 * rr + 1) * 6 + n]) << 16);
                assert_eq!(o[rr * 6 + n], want);
                assert_eq!(t[n * 2 + rr], want);
            }
        }
        let mut r = vec![0u32; 4 * 3];
        pack_rows_rounded(&x, 6, 4, 1..3, &mut r, 3);
        assert_eq!(r[0], 0);
        assert_eq!(r[3 + 2], bf16_bits(x[6 + 4]) | (bf16_bits(x[6 + 5]) << 16));
    }

    #[test]
    fn gemm_levels_agree_with_f64() {
        check::<0>();
        if level() >= 1 {
            check::<1>();
        }
        if level() >= 2 {
            check::<2>();
        }
    }

    /// `gemm_into` without `ACC` writes exactly what zeroing its rows and columns and then `gemm` would: bit for bit (the same
    /// chains), 0 where a row group's key range is empty, and leaves the columns outside `cr` as they were.
    fn check_set<const L: u8>() {
        let (rows, kk, n) = (16, 37, 96);
        let a: Vec<f32> = (0..rows * kk).map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0).collect();
        let b: Vec<f32> = (0..kk * n).map(|i| ((i * 104_729 % 97) as f32 - 48.0) / 13.0).collect();
        let kr = |i0: usize| if i0 == 8 { 0..0 } else { 3..kk - 2 };
        let cr = 32..96;
        let before: Vec<f32> = (0..rows * n).map(|i| i as f32 + 0.5).collect();
        let mut want = before.clone();
        for r in 0..rows {
            want[r * n + cr.start..r * n + cr.end].fill(0.0);
        }
        gemm::<L>(ARef { a: &a, rs: kk, cs: 1 }, &b, n, &mut want, n, rows, kr, cr.clone());
        let mut got = before.clone();
        gemm_into::<L, false>(ARef { a: &a, rs: kk, cs: 1 }, &b, n, &mut got, n, rows, kr, cr.clone());
        assert_eq!(got, want, "level {L}");
        assert!(got[8 * n + 40..12 * n].iter().step_by(n).all(|&x| x == 0.0), "empty key range");
        assert_eq!(got[5 * n..5 * n + 32], before[5 * n..5 * n + 32], "columns outside cr");
    }

    #[test]
    fn gemm_overwrite_is_zero_then_gemm() {
        check_set::<0>();
        if level() >= 1 {
            check_set::<1>();
        }
        if level() >= 2 {
            check_set::<2>();
        }
    }
}
