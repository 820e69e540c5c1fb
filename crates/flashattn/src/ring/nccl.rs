//! The NCCL transport (feature `nccl`): device buffers sent to the next rank and received from the previous
//! one with NCCL point-to-point calls, on a communication stream of their own so they overlap the kernels of
//! the compute stream.
//!
//! `libnccl` is loaded at run time (cudarc's dynamic loading), so this builds on a machine without NCCL;
//! [`probe`] and every constructor return [`Error::BackendUnavailable`] (backend `nccl`) when the library is
//! missing, never panic.
//!
//! One process driving several GPUs uses [`NcclTransport::single_process`]; one process per GPU (several
//! hosts work the same way) creates an [`id`] on rank 0, ships its bytes to the others by any side channel
//! and calls [`NcclTransport::from_rank`] on each rank.

use super::transport::Transport;
use crate::cuda::runtime::guard;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{result as nres, safe as nccl};
use std::collections::VecDeque;
use std::sync::Arc;

/// A block as NCCL moves it: device byte buffers (K and V of a shard, or its dK and dV), received into
/// buffers of the same sizes (every rank's shard has the same size when the sequence length is a multiple
/// of `2N`).
#[derive(Debug)]
pub struct DeviceBlock {
    /// The buffers, sent and received in this order.
    pub bufs: Vec<CudaSlice<u8>>,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable { backend: "nccl", reason: reason.into() }
}

fn nccl_err(what: &str, e: nres::NcclError) -> Error {
    Error::Device(format!("nccl {what}: {e:?}"))
}

/// Whether NCCL can be used: loads `libnccl` and returns its version code (e.g. 22703 for 2.27.3).
pub fn probe() -> Result<i32> {
    // SAFETY: only tries to open the library.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(unavailable("libnccl (libnccl.so.2) not found on the library path"));
    }
    guard("loading NCCL", || nres::get_nccl_version().map_err(|e| nccl_err("version", e)))
}

/// A new NCCL unique id (on rank 0 of a multi-process ring): 128 bytes to hand to every rank.
pub fn id() -> Result<[std::ffi::c_char; 128]> {
    probe()?;
    guard("creating an NCCL id", || nccl::Id::new().map(|i| *i.internal()).map_err(|e| nccl_err("unique id", e)))
}

/// One rank of a ring whose blocks travel over NCCL.
#[derive(Debug)]
pub struct NcclTransport {
    comm: nccl::Comm,
    /// The stream whose kernels produce and consume the blocks.
    compute: Arc<CudaStream>,
    /// Posted exchanges, oldest first: the block sent (kept alive until the send is done) and the one
    /// being received.
    posted: VecDeque<(DeviceBlock, DeviceBlock)>,
}

impl NcclTransport {
    /// The transports of one process driving one GPU per rank: `compute[r]` is rank `r`'s compute stream
    /// (on its own device); each rank gets a communication stream forked from it.
    pub fn single_process(compute: Vec<Arc<CudaStream>>) -> Result<Vec<NcclTransport>> {
        probe()?;
        guard("creating NCCL communicators", || {
            let comm_streams = compute
                .iter()
                .map(|s| s.fork().map_err(|e| Error::Device(format!("forking a stream: {e:?}"))))
                .collect::<Result<Vec<_>>>()?;
            let comms = nccl::Comm::from_devices(comm_streams).map_err(|e| nccl_err("comm init", e))?;
            Ok(comms
                .into_iter()
                .zip(compute)
                .map(|(comm, compute)| NcclTransport { comm, compute, posted: VecDeque::new() })
                .collect())
        })
    }

    /// Rank `rank` of `ranks` (one process per GPU, possibly on several hosts), joining the ring named by
    /// `id` (from [`id`] on rank 0).
    pub fn from_rank(
        compute: Arc<CudaStream>,
        rank: usize,
        ranks: usize,
        id: [std::ffi::c_char; 128],
    ) -> Result<NcclTransport> {
        if rank >= ranks || ranks > i32::MAX as usize {
            return Err(Error::invalid("rank", format!("a rank below {ranks} (and ranks <= i32::MAX)"), rank));
        }
        probe()?;
        guard("joining an NCCL ring", || {
            let stream = compute.fork().map_err(|e| Error::Device(format!("forking a stream: {e:?}")))?;
            let comm = nccl::Comm::from_rank(stream, rank, ranks, nccl::Id::uninit(id))
                .map_err(|e| nccl_err("comm init", e))?;
            Ok(NcclTransport { comm, compute, posted: VecDeque::new() })
        })
    }

    fn peers(&self) -> (i32, i32) {
        let (r, n) = (self.comm.rank(), self.comm.world_size());
        (((r + 1) % n) as i32, ((r + n - 1) % n) as i32)
    }
}

impl Transport<DeviceBlock> for NcclTransport {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn ranks(&self) -> usize {
        self.comm.world_size()
    }

    fn start(&mut self, block: DeviceBlock) -> Result<()> {
        let (next, prev) = self.peers();
        let comm_stream = self.comm.stream();
        guard("posting an NCCL exchange", || {
            // The sends read what the compute stream wrote.
            comm_stream.join(&self.compute).map_err(|e| Error::Device(format!("stream wait: {e:?}")))?;
            let mut recv = Vec::with_capacity(block.bufs.len());
            for b in &block.bufs {
                recv.push(comm_stream.alloc_zeros::<u8>(b.len()).map_err(|e| Error::Device(format!("alloc: {e:?}")))?);
            }
            // Send and receive in one group: each rank's send waits for its neighbour's receive.
            nccl::group_start().map_err(|e| nccl_err("group start", e))?;
            let mut posted = Ok(());
            for (s, r) in block.bufs.iter().zip(recv.iter_mut()) {
                posted = self
                    .comm
                    .send(s, next)
                    .map_err(|e| nccl_err("send", e))
                    .and_then(|_| self.comm.recv(r, prev).map(|_| ()).map_err(|e| nccl_err("recv", e)));
                if posted.is_err() {
                    break;
                }
            }
            let ended = nccl::group_end().map_err(|e| nccl_err("group end", e));
            posted?;
            ended?;
            self.posted.push_back((block, DeviceBlock { bufs: recv }));
            Ok(())
        })
    }

    fn finish(&mut self) -> Result<DeviceBlock> {
        let (sent, recv) = self
            .posted
            .pop_front()
            .ok_or_else(|| Error::Device(format!("nccl rank {}: finish() without a posted exchange", self.rank())))?;
        // The compute stream waits for the transfer; the sent buffers are freed behind it.
        self.compute.join(&self.comm.stream()).map_err(|e| Error::Device(format!("stream wait: {e:?}")))?;
        drop(sent);
        Ok(recv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no libnccl on the library path (CI), the probe is a typed error, not a panic; with one, a
    /// version.
    #[test]
    fn probe_is_typed() {
        match probe() {
            Ok(v) => assert!(v > 0),
            Err(Error::BackendUnavailable { backend, .. }) => assert_eq!(backend, "nccl"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
