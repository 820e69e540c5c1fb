//! Context parallelism: ring attention over `N` ranks (GPUs, or threads simulating them).
//!
//! Each rank holds a zig-zag shard of the sequence ([`ZigZag`]: chunks `r` and `2N-1-r` of `2N`) of q, k
//! and v. In `N` steps the K/V shards travel round the ring ([`Transport`]: send to rank `r + 1`, receive
//! from rank `r - 1`, overlapped with the compute of the current shard); at each step a rank runs the flash
//! kernels on each (query chunk, key chunk) pair that [`RingSchedule`] marks visible and merges the partial
//! outputs through their log-sum-exps ([`merge_into`], the split-KV combine). With a causal mask the
//! zig-zag layout gives every rank the same number of visible pairs. The backward reuses the global `o`
//! and `lse`: each pair's dQ, dK, dV are exact partial sums; dK, dV accumulate while travelling and come
//! home after the last hop.
//!
//! - [`ring_forward`]/[`ring_backward`]: whole host tensors, ranks simulated by threads of this process.
//! - [`rank_forward`]/[`rank_backward`]: one rank's part, over any [`Transport`] (how a multi-process or
//!   multi-host caller runs it).
//! - `ring_forward_cuda`/`ring_backward_cuda` (feature `cuda`): ranks simulated by streams of one GPU, the
//!   CUDA kernels per chunk pair and a device merge (a check of the device path; K/V do not move).
//! - `nccl` (feature `nccl`): an NCCL transport for device buffers, loaded at run time.
//!
//! Supported: no mask or causal (bottom-right aligned, any `sq`, `sk`), any scale, soft-capping, MQA/GQA,
//! f16/bf16/f32 on the CPU backend. ALiBi, sliding windows and varlen are refused with
//! [`crate::Error::Unsupported`]. A multi-GPU ring (device kernels per pair, NCCL between GPUs) is not wired
//! yet: see `docs/notes/ring.md`.
//!
//! ```
//! use flashattn::{ring, AttnOptions, DType, Tensor};
//! let (b, s, h, d) = (1, 64, 2, 32);
//! let x: Vec<f32> = (0..b * s * h * d).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
//! let q = Tensor::from_f32(&x, &[b, s, h, d], DType::BF16)?;
//! let opts = AttnOptions::default().causal();
//! let r = ring::ring_forward(&q, &q, &q, &opts, 4)?; // 4 simulated ranks
//! assert_eq!(r.out.o.shape(), q.shape());
//! assert!(r.stats.iter().all(|st| st.visible == r.stats[0].visible)); // zig-zag: equal causal work
//! # Ok::<(), flashattn::Error>(())
//! ```

#[cfg(feature = "cuda")]
mod gpu;
mod host;
mod merge;
#[cfg(feature = "nccl")]
pub mod nccl;
mod schedule;
mod shard;
mod transport;

#[cfg(feature = "cuda")]
pub use gpu::{ring_backward_cuda, ring_forward_cuda};
pub use host::{
    rank_backward, rank_forward, ring_backward, ring_forward, DkvShard, KvShard, RankStats, RingBackward, RingForward,
    MAX_SIMULATED_RANKS,
};
pub use merge::{combine, merge_into};
pub use schedule::{LocalPair, PairMask, PairWork, RingSchedule};
pub use shard::ZigZag;
pub use transport::{channel_ring, ChannelTransport, Transport};
