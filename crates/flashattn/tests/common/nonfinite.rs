//! The fixture of the non-finite-input tests (`nonfinite.rs` on the CPU, `cuda_nonfinite.rs` on the CUDA
//! kernels): one batch of deterministic finite inputs with a causal mask that leaves the first rows empty, into
//! which a test writes NaN or infinities, and the check of one output row.

use flashattn::{AttnOptions, DType, Tensor};

/// Deterministic, varied, finite values in [-1, 1).
pub fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// `[b, s, h, d]` offset of row `(seq, row, head)`.
pub fn at(shape: &[usize; 4], seq: usize, row: usize, head: usize) -> usize {
    ((seq * shape[1] + row) * shape[2] + head) * shape[3]
}

/// Inputs in f32 (written to tensors of `dtype` by [`Case::tensors`]) and the call's options.
pub struct Case {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub qs: [usize; 4],
    pub ks: [usize; 4],
    pub dtype: DType,
    pub opts: AttnOptions,
}

impl Case {
    /// b = 2, h = 4, hk = 2 (GQA), sq = 150 > sk = 130 at head dim `d` with a causal mask (added to `opts`): the
    /// first 20 rows see no key, and the key range spans several key blocks.
    pub fn new(dtype: DType, d: usize, opts: AttnOptions) -> Self {
        let (qs, ks) = ([2, 150, 4, d], [2, 130, 2, d]);
        let n = |s: &[usize; 4]| s.iter().product::<usize>();
        Case { q: vals(n(&qs), 1), k: vals(n(&ks), 2), v: vals(n(&ks), 3), qs, ks, dtype, opts: opts.causal() }
    }
    pub fn tensors(&self) -> [Tensor; 3] {
        [
            Tensor::from_f32(&self.q, &self.qs, self.dtype).unwrap(),
            Tensor::from_f32(&self.k, &self.ks, self.dtype).unwrap(),
            Tensor::from_f32(&self.v, &self.ks, self.dtype).unwrap(),
        ]
    }
    /// Whether query row `i` sees key `j` (causal, bottom-right aligned).
    pub fn sees(&self, i: usize, j: usize) -> bool {
        j + self.qs[1] <= i + self.ks[1]
    }
    /// Whether query row `i` sees no key.
    pub fn masked(&self, i: usize) -> bool {
        !self.sees(i, 0)
    }
    /// Offset of row `(seq, head, row)` in `lse` (`[b, h, sq]`).
    pub fn lse_at(&self, seq: usize, head: usize, row: usize) -> usize {
        (seq * self.qs[2] + head) * self.qs[1] + row
    }
    /// The values of row `(seq, row, head)` of a tensor shaped like q (o, dq).
    pub fn q_row<'a, T>(&self, x: &'a [T], seq: usize, row: usize, head: usize) -> &'a [T] {
        &x[at(&self.qs, seq, row, head)..at(&self.qs, seq, row, head) + self.qs[3]]
    }
}

/// What one output row must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// A row that sees no key: every value exactly 0, lse -inf.
    Empty,
    /// A row that reads a non-finite input: every value (and lse) NaN.
    Nan,
    /// Every value (and lse) finite.
    Finite,
}

impl Row {
    /// `Empty` where `masked`, else `Nan` where `nan`, else `Finite`.
    pub fn of(masked: bool, nan: bool) -> Row {
        if masked {
            Row::Empty
        } else if nan {
            Row::Nan
        } else {
            Row::Finite
        }
    }
}

/// Asserts that the values of one row, and its lse where given, hold `expect`.
pub fn check_row<T: Copy + Into<f64>>(what: &str, row: &[T], lse: Option<T>, expect: Row) {
    let l = lse.map(Into::into);
    let all = |f: fn(f64) -> bool| row.iter().all(|&x| f(x.into()));
    match expect {
        Row::Empty => {
            assert!(all(|x| x == 0.0) && l.map_or(true, |l| l == f64::NEG_INFINITY), "{what}: not empty (lse {l:?})")
        }
        Row::Nan => {
            assert!(l.map_or(true, f64::is_nan), "{what}: lse {l:?} should be NaN");
            assert!(all(f64::is_nan), "{what}: values should be NaN");
        }
        Row::Finite => {
            assert!(l.map_or(true, f64::is_finite), "{what}: lse {l:?}");
            assert!(all(f64::is_finite), "{what}: values not finite");
        }
    }
}
