//! The CPU backend: tiled FlashAttention with online softmax, `f32` accumulation and O(seqlen) extra
//! memory, parallel over batch, heads and query (or key) tiles with rayon.

pub(crate) mod flash;
pub(crate) mod kernel;
pub(crate) mod pool;
pub(crate) mod tile;
