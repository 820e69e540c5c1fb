//! Backend selection: which backends are usable here, and device-generic entry points that take host
//! tensors, run on the chosen device and return host tensors (what the `flashattn` command and the tests
//! use; frameworks with device memory use the backend modules directly).

use crate::api::{BackwardInputs, ForwardOutput, Gradients};
use crate::error::{Error, Result};
use crate::kvcache::KvCache;
use crate::options::AttnOptions;
use crate::tensor::{Device, Tensor, TensorView};

pub use crate::tensor::BackendStatus;

/// The status of every backend compiled into this build.
pub fn status() -> Vec<BackendStatus> {
    let cpu = BackendStatus {
        name: "cpu",
        usable: true,
        detail: format!("tiled flash attention on {} threads (rayon)", rayon::current_num_threads()),
    };
    vec![cpu, cuda_status()]
}

#[cfg(feature = "cuda")]
fn cuda_status() -> BackendStatus {
    crate::cuda::status()
}

#[cfg(not(feature = "cuda"))]
fn cuda_status() -> BackendStatus {
    BackendStatus { name: "cuda", usable: false, detail: "this build has no `cuda` feature".into() }
}

/// Resolves a device request. `None` means auto: the first CUDA device when one works, else the CPU; the
/// string says which was chosen and why.
pub fn resolve(request: Option<Device>) -> Result<(Device, String)> {
    match request {
        Some(Device::Cpu) => Ok((Device::Cpu, "cpu (requested)".into())),
        Some(Device::Cuda(n)) => {
            let st = cuda_status();
            if st.usable {
                Ok((Device::Cuda(n), format!("cuda:{n} (requested)")))
            } else {
                Err(Error::BackendUnavailable { backend: "cuda", reason: st.detail })
            }
        }
        None => {
            let st = cuda_status();
            if st.usable {
                Ok((Device::Cuda(0), format!("cuda:0 (auto: {})", st.detail)))
            } else {
                Ok((Device::Cpu, format!("cpu (auto: the CUDA backend is not usable: {})", st.detail)))
            }
        }
    }
}

/// Forward pass of host tensors on `device`.
pub fn forward_on(device: Device, q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<ForwardOutput> {
    match device {
        Device::Cpu => crate::api::forward(q, k, v, opts),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::forward_host(n, q, k, v, opts),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => no_cuda(),
    }
}

/// Backward pass of host tensors on `device`.
pub fn backward_on(device: Device, x: &BackwardInputs<&Tensor>, opts: &AttnOptions) -> Result<Gradients> {
    match device {
        Device::Cpu => crate::api::backward(x, opts),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::backward_host(n, x, opts),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => no_cuda(),
    }
}

/// KV-cache attention of host tensors on `device` (the cache is updated in place on the host).
pub fn kvcache_forward_on(
    device: Device,
    q: &TensorView<'_>,
    cache: &mut KvCache<'_>,
    opts: &AttnOptions,
) -> Result<ForwardOutput> {
    match device {
        Device::Cpu => crate::kvcache::kvcache_forward(q, cache, opts),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::kvcache_forward_host(n, q, cache, opts),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => no_cuda(),
    }
}

/// The error of a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
fn no_cuda<T>() -> Result<T> {
    Err(Error::BackendUnavailable { backend: "cuda", reason: "this build has no `cuda` feature".into() })
}

/// Caps the instruction set of the CPU backend's tile products and exponentials: 3 AVX-512F with AVX-512-BF16
/// score products for bf16 inputs (the default, where the machine has it), 2 AVX-512F, 1 AVX2+FMA, 0 plain code. For A/B comparisons and for testing every code path on one
/// machine; process-wide, and results may differ in the last bits between levels.
pub fn set_cpu_simd_cap(level: u8) {
    crate::cpu::kernel::set_simd_cap(level);
}
