//! Small dense tile primitives of the CPU backend, written so the compiler vectorises them.

use crate::problem::{Problem, RowMap};
use crate::semantics::alibi_bias;
use crate::tensor::CpuSlice;

/// `y += a * x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `acc += sum_j p[j] * v[j]` over the rows of `v` (`p.len()` rows of `d`, leading dimension `ldv`): the `P·V` product of one query
/// row, with the accumulator chunk held in registers while the keys stream past (one load per multiply-add).
#[inline(always)]
pub fn pv_row(acc: &mut [f32], p: &[f32], v: &[f32], d: usize, ldv: usize) {
    const W: usize = 16;
    let full = d - d % W;
    let mut c0 = 0;
    while c0 < full {
        let mut a = [0f32; W];
        a.copy_from_slice(&acc[c0..c0 + W]);
        for (j, &pj) in p.iter().enumerate() {
            let vr = &v[j * ldv + c0..j * ldv + c0 + W];
            for l in 0..W {
                a[l] += pj * vr[l];
            }
        }
        acc[c0..c0 + W].copy_from_slice(&a);
        c0 += W;
    }
    if full < d {
        for (j, &pj) in p.iter().enumerate() {
            axpy(&mut acc[full..d], pj, &v[j * ldv + full..j * ldv + d]);
        }
    }
}

/// Loads rows `row0..row0 + n` of `(seq, head)` into `out`, row `r` at `out[r * ld..r * ld + d]` (row-major
/// with leading dimension `ld >= d`; the other entries are left as they are), multiplied by `mul` (an FP8
/// descale; 1 otherwise, and then nothing is multiplied).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn load_rows(
    data: CpuSlice<'_>,
    map: &RowMap,
    seq: usize,
    head: usize,
    row0: usize,
    n: usize,
    d: usize,
    ld: usize,
    out: &mut [f32],
    mul: f32,
) {
    for r in 0..n {
        let row = &mut out[r * ld..r * ld + d];
        data.read_f32(map.at(seq, row0 + r, head), row);
        if mul != 1.0 {
            row.iter_mut().for_each(|x| *x *= mul);
        }
    }
}

/// The score transform of the spec after the dot product: scale, soft-capping, ALiBi. Returns the score and
/// `tanh(x / cap)` (0 when soft-capping is off) for the backward pass.
#[derive(Clone, Copy)]
pub struct ScoreFn {
    pub scale: f32,
    pub softcap: f32,
    pub slope: Option<f32>,
    pub sq: usize,
    pub sk: usize,
}

impl ScoreFn {
    pub fn new(p: &Problem, seq: usize, head: usize) -> Self {
        ScoreFn {
            scale: p.scale,
            softcap: p.softcap,
            slope: p.alibi.as_ref().map(|a| a.slope(seq, head, p.h)),
            sq: p.seqlen_q[seq],
            sk: p.seqlen_k[seq],
        }
    }

    #[inline(always)]
    pub fn apply(&self, qk: f32, i: usize, j: usize) -> (f32, f32) {
        let mut s = qk * self.scale;
        let mut t = 0.0;
        if self.softcap > 0.0 {
            t = (s / self.softcap).tanh();
            s = self.softcap * t;
        }
        if let Some(sl) = self.slope {
            s += alibi_bias(sl, i, j, self.sq, self.sk);
        }
        (s, t)
    }
}
