//! The blocked, register-tiled matrix product shared by the CPU paths: the oracle and baseline in
//! `reference.rs` and the tile products of the CPU flash backward in `cpu/flash.rs`.
//!
//! Every product is `C[i, n] += sum_k A[i, k] B[k, n]` with `B` row-major (rows of `B` contiguous) and `A` read either by rows (`Q`, `P`, `dO`, `dS`) or by columns (`Pᵀ`,
//! `dSᵀ`). A register tile of `R` rows by `W` columns of `C` is held in accumulators while `k` runs over a
//! block of `KC` (one broadcast of `A[i, k]` and one load of `B[k, n..n+W]` per multiply-add group), inside
//! `MB`-row by `NB`-column blocks so that the `KC x NB` panel of `B` stays in cache across row tiles. Each
//! `MB`-row block has its own range of `k` and of columns (the mask's visible region), so hidden blocks
//! are skipped. Within each output element the `k` sum runs in increasing `k`, in `KC` chunks.

use std::ops::Range;

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
    /// `self * a + b`, fused (one rounding).
    fn mul_add(self, a: Self, b: Self) -> Self;
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
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Rows of the register tile.
pub(crate) const R: usize = 4;
/// Rows per cache block (a multiple of `R`).
const MB: usize = 64;
/// Columns per cache block (a multiple of the register tile's width).
const NB: usize = 64;
/// Depth of a cache block.
const KC: usize = 256;

/// Rounds `x` up to a multiple of `m`.
pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// `a * b + c`, fused when `F` (the AVX2+FMA copy), else two roundings.
#[inline(always)]
fn fmadd<T: Real, const F: bool>(a: T, b: T, c: T) -> T {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// How `A` is read: `A[i, k] = a[i * rs + k * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct ARef<'a, T> {
    pub a: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// `C[i, n] += sum_{k in kr} A[i, k] B[k, n]` for `i` in `MB`-row blocks of `0..rows` and `n` in `cr`, where
/// `ranges(i0, i1)` gives each block's `(kr, cr)`; `cr` is aligned to `W` and within `ldb` and `ldc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Real, const F: bool, const W: usize>(
    a: ARef<'_, T>,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
    rows: usize,
    ranges: impl Fn(usize, usize) -> (Range<usize>, Range<usize>),
) {
    assert!(rows % R == 0 && ldb % W == 0 && ldc % W == 0);
    let mut mb0 = 0;
    while mb0 < rows {
        let mb1 = (mb0 + MB).min(rows);
        let (kr, cr) = ranges(mb0, mb1);
        if kr.is_empty() || cr.is_empty() {
            mb0 = mb1;
            continue;
        }
        // Every access of the tiles below lies within these bounds.
        assert!(cr.start % W == 0 && cr.end % W == 0 && cr.end <= ldb && cr.end <= ldc);
        assert!((mb1 - 1) * a.rs + (kr.end - 1) * a.cs < a.a.len());
        assert!((kr.end - 1) * ldb + cr.end <= b.len());
        assert!((mb1 - 1) * ldc + cr.end <= c.len());
        let mut nb0 = cr.start;
        while nb0 < cr.end {
            let nb1 = (nb0 + NB).min(cr.end);
            let mut kb0 = kr.start;
            while kb0 < kr.end {
                let kb1 = (kb0 + KC).min(kr.end);
                for i0 in (mb0..mb1).step_by(R) {
                    for n0 in (nb0..nb1).step_by(W) {
                        // SAFETY: i0 + R <= mb1, kb1 <= kr.end and n0 + W <= cr.end: inside the asserted bounds.
                        unsafe { tile::<T, F, W>(a, i0, kb0, kb1, b, ldb, n0, c, ldc) };
                    }
                }
                kb0 = kb1;
            }
            nb0 = nb1;
        }
        mb0 = mb1;
    }
}

/// One `R x W` register tile: `C[i0.., n0..] += A[i0.., k0..k1] B[k0..k1, n0..]`.
///
/// # Safety
/// `(i0 + R - 1) * a.rs + (k1 - 1) * a.cs < a.a.len()`, `(k1 - 1) * ldb + n0 + W <= b.len()` and
/// `(i0 + R - 1) * ldc + n0 + W <= c.len()`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<T: Real, const F: bool, const W: usize>(
    a: ARef<'_, T>,
    i0: usize,
    k0: usize,
    k1: usize,
    b: &[T],
    ldb: usize,
    n0: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut acc = [[T::ZERO; W]; R];
    let (ap, bp) = (a.a.as_ptr(), b.as_ptr());
    for k in k0..k1 {
        let brow = &*(bp.add(k * ldb + n0) as *const [T; W]);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = *ap.add((i0 + r) * a.rs + k * a.cs);
            for l in 0..W {
                row[l] = fmadd::<T, F>(av, brow[l], row[l]);
            }
        }
    }
    let cp = c.as_mut_ptr();
    for (r, row) in acc.iter().enumerate() {
        let dst = &mut *(cp.add((i0 + r) * ldc + n0) as *mut [T; W]);
        for l in 0..W {
            dst[l] += row[l];
        }
    }
}

/// Writes the transpose of the first `d` columns of `x` (`rows` rows, leading dimension `ld`) into `t`
/// (`[d, ld_t]`: `t[c * ld_t + r] = x[r * ld + c]`), in 16 x 16 blocks so both sides walk cache lines.
/// Entries of `t` outside the first `rows` columns are left as they are.
pub(crate) fn transpose_into<T: Real>(x: &[T], rows: usize, ld: usize, d: usize, t: &mut [T], ld_t: usize) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..d).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(d) {
                    t[c * ld_t + r] = x[r * ld + c];
                }
            }
        }
    }
}
