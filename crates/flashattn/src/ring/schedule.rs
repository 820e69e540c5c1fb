//! The ring schedule: at step `s`, rank `r` holds the K/V shard of rank `(r - s) mod N` and meets each of
//! its two query chunks with each of that shard's two key chunks. A (query chunk, key chunk) pair is fully
//! visible, partly visible (on the causal diagonal), or skipped.
//!
//! How a partly visible pair maps onto the library's masks (ATTENTION.md, "Visibility": bottom-right
//! aligned): globally, key `j` is visible to query `i` when `j <= i + sk - sq`. For query rows
//! `qa .. qa + cq` and key rows `kb .. kb + ck`, in local coordinates this is `j' <= i' + t` with
//! `t = qa + sk - sq - kb`. A local call over the first `n` keys of the chunk, with `cq` queries and a window
//! `(-1, right)`, sees `j' <= i' + n - cq + right` and `j' < n`. Taking `n = min(ck, cq + t)` (the keys the
//! last row can reach) and `right = t - n + cq >= 0` gives exactly the global pattern; keys past `n` are
//! seen by no row. In zig-zag with `sq = sk`, a partial pair is always a diagonal chunk (`qa = kb`, `t = 0`,
//! `cq = ck`): plain causal, `n = ck`, `right = 0`.

use super::shard::ZigZag;
use crate::error::{Error, Result};
use crate::semantics::Mask;
use std::ops::Range;

/// How much of a (query chunk, key chunk) pair is visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairMask {
    /// Every key of the chunk is visible to every query of the chunk: no mask.
    Full,
    /// Only the first `keys` keys of the chunk can be visible, and query `i'` sees key `j'` when
    /// `j' <= i' + keys - cq + right` (the library's window `(-1, right)` over `keys` keys; causal when
    /// `right = 0`).
    Partial {
        /// Keys of the chunk to pass to the local call (the rest are seen by no query).
        keys: usize,
        /// Right side of the local window.
        right: usize,
    },
    /// No query of the chunk sees any key of the chunk.
    Skip,
}

impl PairMask {
    /// The mask of query rows `q` against key rows `k` of a problem with `sq` queries and `sk` keys,
    /// causal (bottom-right aligned) or not.
    pub fn of(causal: bool, sq: usize, sk: usize, q: Range<usize>, k: Range<usize>) -> PairMask {
        if q.is_empty() || k.is_empty() {
            return PairMask::Skip;
        }
        if !causal {
            return PairMask::Full;
        }
        // t = qa + sk - sq - kb, in i128 so that no combination of sizes overflows.
        let t = q.start as i128 + sk as i128 - sq as i128 - k.start as i128;
        let (cq, ck) = (q.len() as i128, k.len() as i128);
        if cq - 1 + t < 0 {
            return PairMask::Skip; // the last query row sees no key of the chunk
        }
        if t >= ck - 1 {
            return PairMask::Full; // the first query row already sees every key
        }
        let keys = ck.min(cq + t);
        let right = t - keys + cq;
        PairMask::Partial { keys: keys as usize, right: right as usize }
    }

    /// The number of visible (query, key) pairs of a `cq × ck` chunk pair under this mask.
    pub fn visible(&self, cq: usize, ck: usize) -> u64 {
        match *self {
            PairMask::Full => (cq * ck) as u64,
            PairMask::Skip => 0,
            PairMask::Partial { keys, right } => {
                let m = Mask { left: None, right: Some(right) };
                (0..cq).map(|i| m.key_range(i, cq, keys).len() as u64).sum()
            }
        }
    }
}

/// One (query chunk, key chunk) pair of a ring step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairWork {
    /// Global index of the query chunk (one of the rank's own).
    pub q_chunk: usize,
    /// Global index of the key/value chunk (one of the visiting shard's).
    pub kv_chunk: usize,
    /// What of the pair is visible.
    pub mask: PairMask,
}

/// Which chunk pairs every rank computes at every step of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSchedule {
    /// The zig-zag layout of the queries.
    pub q: ZigZag,
    /// The zig-zag layout of the keys and values.
    pub k: ZigZag,
    /// Whether the mask is causal (bottom-right aligned); otherwise every key is visible.
    pub causal: bool,
}

/// Where a chunk pair's data sits in the shards of one ring step: the rows a local call reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPair {
    /// Which of the rank's two query chunks (0 or 1, shard order).
    pub q_slot: usize,
    /// Rows of the rank's query shard (`q`, `o`, `dout`, `lse` rows).
    pub q: Range<usize>,
    /// Rows of the visiting key/value shard the call reads: the chunk, cut to the keys the mask can see.
    pub k: Range<usize>,
}

impl RingSchedule {
    /// The shard rows of pair `w` of rank `rank` (one of [`RingSchedule::step`]'s pairs).
    pub fn local(&self, rank: usize, w: &PairWork) -> LocalPair {
        let q_slot = usize::from(w.q_chunk != self.q.rank_chunks(rank)[0]);
        let q0 = if q_slot == 0 { 0 } else { self.q.rank_rows(rank)[0].len() };
        let (_, k0) = self.k.locate(w.kv_chunk);
        let ck = self.k.chunk(w.kv_chunk).len();
        let nk = match w.mask {
            PairMask::Partial { keys, .. } => keys,
            _ => ck,
        };
        LocalPair { q_slot, q: q0..q0 + self.q.chunk(w.q_chunk).len(), k: k0..k0 + nk }
    }

    /// The schedule of `ranks` ranks for `sq` queries and `sk` keys.
    pub fn new(ranks: usize, sq: usize, sk: usize, causal: bool) -> Result<Self> {
        Ok(RingSchedule { q: ZigZag::new(ranks, sq)?, k: ZigZag::new(ranks, sk)?, causal })
    }

    /// Number of ranks (also the number of steps).
    pub fn ranks(&self) -> usize {
        self.q.ranks()
    }

    /// The rank whose K/V shard rank `rank` holds at step `step`: `(rank - step) mod N`.
    pub fn source(&self, rank: usize, step: usize) -> usize {
        let n = self.ranks();
        (rank + n - step % n) % n
    }

    /// The four chunk pairs of rank `rank` at step `step` (skipped ones included, marked [`PairMask::Skip`]).
    pub fn step(&self, rank: usize, step: usize) -> Result<Vec<PairWork>> {
        let n = self.ranks();
        if rank >= n || step >= n {
            return Err(Error::invalid(
                "rank",
                format!("rank and step below {n}"),
                format!("rank {rank}, step {step}"),
            ));
        }
        let src = self.source(rank, step);
        let mut out = Vec::with_capacity(4);
        for qc in self.q.rank_chunks(rank) {
            for kc in self.k.rank_chunks(src) {
                let mask = PairMask::of(self.causal, self.q.len(), self.k.len(), self.q.chunk(qc), self.k.chunk(kc));
                out.push(PairWork { q_chunk: qc, kv_chunk: kc, mask });
            }
        }
        Ok(out)
    }

    /// The pairs rank `rank` computes at step `step` (those not [`PairMask::Skip`]), each with its shard rows.
    pub fn pairs(&self, rank: usize, step: usize) -> Result<Vec<(PairWork, LocalPair)>> {
        Ok(self
            .step(rank, step)?
            .into_iter()
            .filter(|w| w.mask != PairMask::Skip)
            .map(|w| {
                let at = self.local(rank, &w);
                (w, at)
            })
            .collect())
    }

    /// The visible (query, key) pairs rank `rank` computes over the whole ring (per head and sequence): its
    /// share of the work.
    pub fn work(&self, rank: usize) -> Result<u64> {
        let mut total = 0;
        for s in 0..self.ranks() {
            for w in self.step(rank, s)? {
                total += w.mask.visible(self.q.chunk(w.q_chunk).len(), self.k.chunk(w.kv_chunk).len());
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (query, key) pair of every chunk pair is classified exactly as the global mask says.
    #[test]
    fn pair_masks_match_the_global_mask() {
        let shapes = [(8, 8), (7, 7), (5, 9), (9, 5), (12, 3), (3, 12), (1, 6), (6, 1), (10, 11)];
        for causal in [false, true] {
            let global = if causal { Mask::CAUSAL } else { Mask::NONE };
            for (sq, sk) in shapes {
                for ranks in 1..4 {
                    let s = RingSchedule::new(ranks, sq, sk, causal).unwrap();
                    let mut covered = vec![0u8; sq * sk];
                    for rank in 0..ranks {
                        for step in 0..ranks {
                            for w in s.step(rank, step).unwrap() {
                                let (qr, kr) = (s.q.chunk(w.q_chunk), s.k.chunk(w.kv_chunk));
                                for (li, i) in qr.clone().enumerate() {
                                    for (lj, j) in kr.clone().enumerate() {
                                        let want = global.visible(i, j, sq, sk);
                                        let got = match w.mask {
                                            PairMask::Full => true,
                                            PairMask::Skip => false,
                                            PairMask::Partial { keys, right } => {
                                                lj < keys
                                                    && Mask { left: None, right: Some(right) }.visible(
                                                        li,
                                                        lj,
                                                        qr.len(),
                                                        keys,
                                                    )
                                            }
                                        };
                                        assert_eq!(
                                            want, got,
                                            "causal {causal} sq {sq} sk {sk} ranks {ranks} {w:?} i {i} j {j}"
                                        );
                                        covered[i * sk + j] += 1;
                                    }
                                }
                            }
                        }
                    }
                    assert!(covered.iter().all(|&c| c == 1), "every pair met exactly once");
                }
            }
        }
    }

    /// `local` places each pair in the shards: its query rows are the rank's copy of the query chunk, and
    /// its key rows start where the key chunk sits in the visiting shard and hold the keys the mask can see.
    #[test]
    fn local_rows_match_the_shards() {
        for (sq, sk, causal) in [(16, 16, true), (9, 14, true), (14, 9, false), (30, 30, true)] {
            for ranks in 1..5 {
                let s = RingSchedule::new(ranks, sq, sk, causal).unwrap();
                for rank in 0..ranks {
                    for step in 0..ranks {
                        let src = s.source(rank, step);
                        for w in s.step(rank, step).unwrap() {
                            let at = s.local(rank, &w);
                            let rows = s.q.rank_rows(rank);
                            assert_eq!(rows[at.q_slot], s.q.chunk(w.q_chunk));
                            let q0 = if at.q_slot == 0 { 0 } else { rows[0].len() };
                            assert_eq!(at.q, q0..q0 + rows[at.q_slot].len());
                            let kc = s.k.chunk(w.kv_chunk);
                            let [ka, _] = s.k.rank_rows(src);
                            let k0 = if kc == ka { 0 } else { ka.len() };
                            assert_eq!(at.k.start, k0);
                            let keys = match w.mask {
                                PairMask::Partial { keys, .. } => keys,
                                _ => kc.len(),
                            };
                            assert_eq!(at.k.len(), keys);
                            assert!(at.k.end <= s.k.rank_len(src));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn diagonal_pairs_are_plain_causal() {
        let s = RingSchedule::new(4, 64, 64, true).unwrap();
        for rank in 0..4 {
            let w = s.step(rank, 0).unwrap();
            let diag: Vec<_> = w.iter().filter(|w| w.q_chunk == w.kv_chunk).collect();
            assert_eq!(diag.len(), 2);
            assert!(diag.iter().all(|w| w.mask == PairMask::Partial { keys: 8, right: 0 }));
        }
    }

    /// Zig-zag balances causal work exactly when the length is a multiple of 2N.
    #[test]
    fn zigzag_balances_causal_work() {
        for ranks in 1..=8 {
            let len = 2 * ranks * 5;
            let s = RingSchedule::new(ranks, len, len, true).unwrap();
            let work: Vec<u64> = (0..ranks).map(|r| s.work(r).unwrap()).collect();
            let total = (len * (len + 1) / 2) as u64;
            assert_eq!(work.iter().sum::<u64>(), total);
            assert!(work.iter().all(|&w| w == work[0]), "ranks {ranks}: {work:?}");
            // Contiguous sharding would not be balanced: rank r's rows see r·c .. (r+1)·c keys.
        }
        assert_eq!(RingSchedule::new(2, 4, 4, true).unwrap().step(2, 0).unwrap_err().arg(), Some("rank"));
    }
}
