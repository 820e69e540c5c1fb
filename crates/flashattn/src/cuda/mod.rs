//! The CUDA backend (kernels compiled at run time by NVRTC). Placeholder until the runtime lands: every
//! call reports that the backend is not available.

use crate::api::{ForwardOutput, Gradients};
use crate::backends::BackendStatus;
use crate::error::{Error, Result};
use crate::kvcache::KvCache;
use crate::options::AttnOptions;
use crate::tensor::{Tensor, TensorView};

fn unavailable<T>() -> Result<T> {
    Err(Error::BackendUnavailable { backend: "cuda", reason: "the CUDA runtime is not implemented yet".into() })
}

/// Whether the CUDA backend can run here.
pub fn status() -> BackendStatus {
    BackendStatus { name: "cuda", usable: false, detail: "the CUDA runtime is not implemented yet".into() }
}

/// Forward pass of host tensors on CUDA device `n`.
pub fn forward_host(_n: usize, _q: &Tensor, _k: &Tensor, _v: &Tensor, _o: &AttnOptions) -> Result<ForwardOutput> {
    unavailable()
}

/// Backward pass of host tensors on CUDA device `n`.
#[allow(clippy::too_many_arguments)]
pub fn backward_host(
    _n: usize,
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _o: &Tensor,
    _lse: &Tensor,
    _dout: &Tensor,
    _opts: &AttnOptions,
) -> Result<Gradients> {
    unavailable()
}

/// KV-cache attention of host tensors on CUDA device `n`.
pub fn kvcache_forward_host(
    _n: usize,
    _q: &TensorView<'_>,
    _c: &mut KvCache<'_>,
    _o: &AttnOptions,
) -> Result<ForwardOutput> {
    unavailable()
}

/// Compiles every kernel variant for the given architectures (e.g. `sm_80`, `sm_90a`) into the cache.
pub fn precompile(_archs: &[String]) -> Result<Vec<String>> {
    unavailable()
}
