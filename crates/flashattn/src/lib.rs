//! # flashattn
//!
//! Exact, memory-efficient attention (FlashAttention) in Rust: `softmax(scale · Q Kᵀ) V` without storing the
//! `N × N` score matrix, with every variant FlashAttention offers — causal and sliding-window masks,
//! ALiBi, soft-capping, MQA/GQA, variable-length batches, KV-cache inference with paged caches and rotary
//! embeddings — forward and backward.
//!
//! The semantics (one definition for every backend) live in [`semantics`]; validation in [`problem`];
//! the `f64` oracle and the naive formula in [`reference`]; the spec's accuracy rule in [`accuracy`].
//!
//! ```
//! use flashattn::{backward, forward, AttnOptions, BackwardInputs, DType, Tensor};
//! let (b, s, h, d) = (1, 16, 2, 32);
//! let x: Vec<f32> = (0..b * s * h * d).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
//! let q = Tensor::from_f32(&x, &[b, s, h, d], DType::BF16)?;
//! let opts = AttnOptions::default().causal();
//! let out = forward(&q, &q, &q, &opts)?;
//! let grads = backward(&BackwardInputs { q: &q, k: &q, v: &q, o: &out.o, lse: &out.lse, dout: &out.o }, &opts)?;
//! assert_eq!(grads.dq.shape(), q.shape());
//! # Ok::<(), flashattn::Error>(())
//! ```
#![warn(missing_docs)]

pub mod accuracy;
mod api;
pub mod backends;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
mod gemm;
pub mod kvcache;
pub mod options;
pub mod problem;
pub mod reference;
pub mod ring;
pub mod semantics;
pub mod tensor;
pub mod tuning;

pub use api::{
    backward, backward_into, backward_into_of, forward, forward_into, BackwardInputs, ForwardOutput, Gradients,
    GradientsMut,
};
pub use backends::{backward_on, forward_on, kvcache_forward_on};
pub use cpu::pool::release as release_cpu_workspace;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};

/// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
pub use kvcache::{kvcache_forward, CacheSeqlens, KvCache, Rotary, Values};
pub use options::{AttnOptions, VarLen};
pub use semantics::Mask;
pub use tensor::{CpuSlice, CpuSliceMut, CpuStorage, Device, Layout, Tensor, TensorView, TensorViewMut};
pub use tuning::{CudaPath, Tuning};
