//! Zig-zag sharding of a sequence over the ranks of a ring.
//!
//! The sequence of `len` rows is cut into `2N` chunks (chunk `c` is rows `c·len/2N .. (c+1)·len/2N`, so
//! chunk sizes differ by at most one row), and rank `r` holds chunks `r` and `2N-1-r`, in that order. With a
//! causal mask, an early chunk sees few keys and its late partner many, so every rank does the same amount
//! of work (asserted by the tests when `len` is a multiple of `2N`).

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::ops::Range;

/// The zig-zag layout of a sequence of `len` rows over `ranks` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZigZag {
    ranks: usize,
    len: usize,
}

impl ZigZag {
    /// The layout of `len` rows over `ranks` ranks (`ranks >= 1`).
    pub fn new(ranks: usize, len: usize) -> Result<Self> {
        if ranks == 0 {
            return Err(Error::invalid("ranks", "at least 1 rank", 0));
        }
        if ranks.checked_mul(2).is_none() {
            return Err(Error::invalid("ranks", "a rank count whose double fits in usize", ranks));
        }
        Ok(ZigZag { ranks, len })
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Rows of the whole sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the sequence has no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks (`2 · ranks`).
    pub fn chunks(&self) -> usize {
        2 * self.ranks
    }

    fn boundary(&self, c: usize) -> usize {
        // u128: `c · len` cannot overflow, and the result is at most `len`.
        (c as u128 * self.len as u128 / self.chunks() as u128) as usize
    }

    /// The global rows of chunk `c` (`c < 2 · ranks`).
    pub fn chunk(&self, c: usize) -> Range<usize> {
        self.boundary(c)..self.boundary(c + 1)
    }

    /// The two chunks rank `r` holds, in the order they are stored in its shard: `[r, 2N-1-r]`.
    pub fn rank_chunks(&self, r: usize) -> [usize; 2] {
        [r, self.chunks() - 1 - r]
    }

    /// The global rows of rank `r`'s shard, as its two chunks in shard order.
    pub fn rank_rows(&self, r: usize) -> [Range<usize>; 2] {
        let [a, b] = self.rank_chunks(r);
        [self.chunk(a), self.chunk(b)]
    }

    /// Rows of rank `r`'s shard.
    pub fn rank_len(&self, r: usize) -> usize {
        self.rank_rows(r).iter().map(|c| c.len()).sum()
    }

    /// Where chunk `c` lives: its rank and the row of that rank's shard where it starts.
    pub fn locate(&self, c: usize) -> (usize, usize) {
        if c < self.ranks {
            (c, 0)
        } else {
            let r = self.chunks() - 1 - c;
            (r, self.chunk(r).len())
        }
    }

    fn check_dim(&self, arg: &'static str, shape: &[usize], dim: usize, len: usize) -> Result<()> {
        if dim >= shape.len() {
            return Err(Error::invalid(arg, format!("a tensor with a dimension {dim} to shard"), format!("{shape:?}")));
        }
        if shape[dim] != len {
            return Err(Error::invalid(arg, format!("{len} rows in dimension {dim}"), format!("shape {shape:?}")));
        }
        Ok(())
    }

    /// Cuts `t` along dimension `dim` (which must have [`ZigZag::len`] rows) into one contiguous shard per
    /// rank. Values are copied exactly (through `f32`, which holds every f16, bf16 and f32 value).
    pub fn shard(&self, t: &Tensor, dim: usize) -> Result<Vec<Tensor>> {
        self.check_dim("tensor", t.shape(), dim, self.len)?;
        let shape = t.shape();
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product();
        let x = t.to_f32_vec();
        (0..self.ranks)
            .map(|r| {
                let rows = self.rank_rows(r);
                let mut s = shape.to_vec();
                s[dim] = self.rank_len(r);
                let mut out = Vec::with_capacity(outer * s[dim] * inner);
                for o in 0..outer {
                    for c in &rows {
                        out.extend_from_slice(&x[(o * self.len + c.start) * inner..(o * self.len + c.end) * inner]);
                    }
                }
                Tensor::from_f32(&out, &s, t.dtype())
            })
            .collect()
    }

    /// Puts the shards of [`ZigZag::shard`] back together along dimension `dim`.
    pub fn unshard(&self, shards: &[Tensor], dim: usize) -> Result<Tensor> {
        if shards.len() != self.ranks {
            return Err(Error::invalid("shards", format!("{} shards (one per rank)", self.ranks), shards.len()));
        }
        let first = &shards[0];
        let dtype = first.dtype();
        let mut shape = first.shape().to_vec();
        self.check_dim("shards", &shape, dim, self.rank_len(0))?;
        shape[dim] = self.len;
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product();
        let mut out = vec![f32::NAN; outer * self.len * inner]; // every element is written below
        for (r, t) in shards.iter().enumerate() {
            let rl = self.rank_len(r);
            self.check_dim("shards", t.shape(), dim, rl)?;
            let mut want = shape.clone();
            want[dim] = rl;
            if t.shape() != want.as_slice() || t.dtype() != dtype {
                return Err(Error::invalid(
                    "shards",
                    format!("shard {r} of shape {want:?} and dtype {dtype}"),
                    format!("shape {:?} and dtype {}", t.shape(), t.dtype()),
                ));
            }
            let x = t.to_f32_vec();
            for o in 0..outer {
                let mut src = o * rl * inner;
                for c in self.rank_rows(r) {
                    let n = c.len() * inner;
                    let dst = (o * self.len + c.start) * inner;
                    out[dst..dst + n].copy_from_slice(&x[src..src + n]);
                    src += n;
                }
            }
        }
        Tensor::from_f32(&out, &shape, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn chunks_cover_the_sequence_once() {
        for ranks in 1..6 {
            for len in [0, 1, 3, 7, 16, 33, 100] {
                let z = ZigZag::new(ranks, len).unwrap();
                let mut seen = vec![0u8; len];
                for r in 0..ranks {
                    for c in z.rank_rows(r) {
                        c.for_each(|i| seen[i] += 1);
                    }
                    let [a, b] = z.rank_chunks(r);
                    assert_eq!(z.locate(a), (r, 0));
                    assert_eq!(z.locate(b), (r, z.chunk(a).len()));
                }
                assert!(seen.iter().all(|&n| n == 1), "ranks {ranks} len {len}: {seen:?}");
                for c in 0..z.chunks() {
                    let n = z.chunk(c).len();
                    assert!(n == len / z.chunks() || n == len / z.chunks() + 1);
                }
            }
        }
        assert_eq!(ZigZag::new(0, 4).unwrap_err().arg(), Some("ranks"));
    }

    #[test]
    fn zigzag_order_of_two_ranks() {
        let z = ZigZag::new(2, 8).unwrap();
        assert_eq!(z.rank_rows(0), [0..2, 6..8]);
        assert_eq!(z.rank_rows(1), [2..4, 4..6]);
    }

    #[test]
    fn shard_round_trip() {
        let x: Vec<f32> = (0..2 * 11 * 3 * 2).map(|i| i as f32 * 0.5 - 7.0).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = Tensor::from_f32(&x, &[2, 11, 3, 2], dtype).unwrap();
            for ranks in 1..5 {
                let z = ZigZag::new(ranks, 11).unwrap();
                let shards = z.shard(&t, 1).unwrap();
                assert_eq!(shards.iter().map(|s| s.shape()[1]).sum::<usize>(), 11);
                // Row 0 of rank 0's shard is global row 0; its second chunk starts at chunk 2N-1.
                let s0 = shards[0].to_f32_vec();
                assert_eq!(s0[0], t.to_f32_vec()[0]);
                assert_eq!(z.unshard(&shards, 1).unwrap(), t);
            }
        }
        let z = ZigZag::new(2, 11).unwrap();
        let t = Tensor::zeros(&[2, 10, 3, 2], DType::F32);
        assert_eq!(z.shard(&t, 1).unwrap_err().arg(), Some("tensor"));
        assert_eq!(z.shard(&t, 4).unwrap_err().arg(), Some("tensor"));
        let shards = z.shard(&Tensor::zeros(&[2, 11, 3, 2], DType::F32), 1).unwrap();
        assert_eq!(z.unshard(&shards[..1], 1).unwrap_err().arg(), Some("shards"));
        let mut bad = shards.clone();
        bad[1] = Tensor::zeros(&[2, 5, 3, 3], DType::F32);
        assert_eq!(z.unshard(&bad, 1).unwrap_err().arg(), Some("shards"));
    }
}
