//! How blocks travel round the ring: every rank sends to rank `r + 1` and receives from rank `r - 1`.
//!
//! An exchange is split in two so it overlaps the compute of the current block: [`Transport::start`] posts
//! the send of this rank's block and the receive of the previous rank's, and returns at once;
//! [`Transport::finish`] waits for the oldest posted exchange and returns the block received. Every rank
//! calls `start` and `finish` the same number of times in the same order (the ring algorithms in
//! [`super::host`] do), so a send is always matched by a receive on the next rank.
//!
//! Implementations: [`ChannelTransport`] (ranks simulated by threads of one process, blocks moved through
//! channels: what the tests and `flashattn bench --ranks N` run), and, behind the `nccl` feature,
//! `super::nccl::NcclTransport` (device buffers over NCCL send/recv, one GPU per rank).

use crate::error::{Error, Result};
use std::sync::mpsc::{channel, Receiver, Sender};

/// Sends blocks of type `M` to the next rank of the ring and receives them from the previous one.
pub trait Transport<M> {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the ring.
    fn ranks(&self) -> usize;
    /// Posts the send of `block` to rank `rank + 1` and a receive from rank `rank - 1` (mod ranks); does not
    /// wait for either.
    fn start(&mut self, block: M) -> Result<()>;
    /// Waits for the oldest posted exchange and returns the block received from rank `rank - 1`.
    fn finish(&mut self) -> Result<M>;
}

/// A rank of a ring simulated in one process: blocks move through channels, no copy.
#[derive(Debug)]
pub struct ChannelTransport<M> {
    rank: usize,
    ranks: usize,
    tx: Sender<M>,
    rx: Receiver<M>,
    posted: usize,
}

/// The transports of a ring of `ranks` ranks simulated in one process (give one to each rank's thread).
pub fn channel_ring<M>(ranks: usize) -> Result<Vec<ChannelTransport<M>>> {
    if ranks == 0 {
        return Err(Error::invalid("ranks", "at least 1 rank", 0));
    }
    // Channel c carries blocks from rank c to rank c + 1.
    let (txs, mut rxs): (Vec<Sender<M>>, Vec<Option<Receiver<M>>>) =
        (0..ranks).map(|_| channel()).map(|(t, r)| (t, Some(r))).unzip();
    let mut out = Vec::with_capacity(ranks);
    for (rank, tx) in txs.into_iter().enumerate() {
        let prev = (rank + ranks - 1) % ranks;
        let rx = rxs[prev].take().ok_or_else(|| Error::Device("ring: channel taken twice".into()))?;
        out.push(ChannelTransport { rank, ranks, tx, rx, posted: 0 });
    }
    Ok(out)
}

impl<M> Transport<M> for ChannelTransport<M> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.ranks
    }
    fn start(&mut self, block: M) -> Result<()> {
        self.tx.send(block).map_err(|_| peer_gone(self.rank, "next"))?;
        self.posted += 1;
        Ok(())
    }
    fn finish(&mut self) -> Result<M> {
        if self.posted == 0 {
            return Err(Error::Device(format!("ring rank {}: finish() without a posted exchange", self.rank)));
        }
        self.posted -= 1;
        self.rx.recv().map_err(|_| peer_gone(self.rank, "previous"))
    }
}

/// The error of a rank whose neighbour stopped (it failed, and its own error says why).
pub(crate) fn peer_gone(rank: usize, which: &str) -> Error {
    Error::Device(format!("{PEER_GONE}: rank {rank}'s {which} rank stopped"))
}

/// Prefix of [`peer_gone`] errors, so the root cause of a failed ring can be told from its echoes.
pub(crate) const PEER_GONE: &str = "ring peer stopped";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_go_round_the_ring() {
        for ranks in 1..5 {
            let ts = channel_ring::<usize>(ranks).unwrap();
            let got: Vec<Vec<usize>> = std::thread::scope(|s| {
                let hs: Vec<_> = ts
                    .into_iter()
                    .map(|mut t| {
                        s.spawn(move || {
                            let mut block = t.rank();
                            let mut seen = vec![block];
                            for _ in 1..t.ranks() {
                                t.start(block).unwrap();
                                block = t.finish().unwrap();
                                seen.push(block);
                            }
                            seen
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, seen) in got.iter().enumerate() {
                let want: Vec<usize> = (0..ranks).map(|s| (r + ranks - s) % ranks).collect();
                assert_eq!(seen, &want);
            }
        }
        let mut t = channel_ring::<u8>(2).unwrap().pop().unwrap();
        assert!(t.finish().is_err());
        assert!(t.start(1).is_err()); // rank 0 (its receiver) is gone
        assert_eq!(channel_ring::<u8>(0).unwrap_err().arg(), Some("ranks"));
    }
}
