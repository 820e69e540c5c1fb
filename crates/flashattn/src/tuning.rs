//! Dispatch and tuning choices of the CUDA backend, passed with each call ([`crate::AttnOptions::tuning`]).
//!
//! `Tuning::default()` is the library's chosen behaviour (the measured defaults of `docs/notes/`); the other
//! values exist to compare kernels (A/B runs in one process), to test a fallback path on hardware that would
//! otherwise not take it, and to try compile-time experiments. The CPU backends ignore every field. The library
//! reads no environment variable for any of this: the kernel cache folder (`FLASHATTN_CACHE_DIR`, see
//! `cuda::cache`) is the only one it reads.
//!
//! ```
//! use flashattn::{AttnOptions, CudaPath, Tuning};
//! // Run a call on the sm80-class kernels even on Hopper, with a fixed KV-cache split count.
//! let opts = AttnOptions { tuning: Tuning { cuda_path: CudaPath::Sm80, num_splits: 4, ..Tuning::default() }, ..AttnOptions::default() };
//! assert_ne!(opts.tuning, Tuning::default());
//! ```

/// Which family of CUDA kernels runs a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CudaPath {
    /// The Hopper (sm90) kernels on an sm_90a device wherever they cover the problem (f16/bf16, 16-byte aligned
    /// layouts, no `seqused_k`, ...), the sm80-class kernels everywhere else.
    #[default]
    Auto,
    /// The sm80-class kernels on every device, Hopper included (to test that fallback on a Hopper GPU).
    Sm80,
}

impl std::str::FromStr for CudaPath {
    type Err = crate::Error;
    /// `auto` or `sm80` (case-insensitive).
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CudaPath::Auto),
            "sm80" => Ok(CudaPath::Sm80),
            _ => Err(crate::Error::invalid("cuda path", "auto or sm80", s)),
        }
    }
}

/// Dispatch and tuning choices of the CUDA backend for one call. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tuning {
    /// Kernel family of the forward and backward passes (the backward also follows [`Self::bwd_path`]).
    /// Default [`CudaPath::Auto`].
    pub cuda_path: CudaPath,
    /// Kernel family of the backward pass alone: [`CudaPath::Sm80`] keeps the backward off the Hopper kernel
    /// while the forward may still use its own. The backward runs on the sm80-class kernel when either this or
    /// [`Self::cuda_path`] says [`CudaPath::Sm80`]. Default [`CudaPath::Auto`].
    pub bwd_path: CudaPath,
    /// The sm90 forward at head dim 64 with 192-row query tiles (3 consumer warpgroups, 512 threads); `false`
    /// runs the 128-row kernel of the other head dims instead. Default `true`.
    pub sm90_d64_bm192: bool,
    /// The sm90 forward's 176-key K/V blocks at head dim 128 (128 x 176 tiles): `None` leaves the choice to the
    /// rule (wide without a mask from 8192 keys), `Some(true)` forces the 176-key kernel, `Some(false)` the
    /// 128-key one. Default `None`.
    pub sm90_wide_kv_d128: Option<bool>,
    /// The sm90 forward's 80-key K/V blocks at head dim 256 (128 x 80 tiles, FA3's d256 shape): `None` leaves
    /// the choice to the rule (wide without a mask, and with one from 2048 keys), `Some(true)` forces the 80-key
    /// kernel, `Some(false)` the 64-key one. Default `None`.
    pub sm90_wide_kv_d256: Option<bool>,
    /// L2 budget in MiB of the sm90 forward's tile order (how many (batch, head) pairs form one scheduling
    /// group, so that their K/V stay in the L2): `None` takes the rule (8 MiB without a mask, 24 MiB with one,
    /// and one group of every pair for causal-like masks from 4096 keys); `Some(n)` uses `n` MiB everywhere.
    /// Default `None`.
    pub sm90_l2_group_mib: Option<u64>,
    /// The sm90 forward's consumer warpgroups take turns issuing their matrix products (ping-pong); `false`
    /// lets them issue freely. Default `true`.
    pub sm90_pingpong: bool,
    /// L2 budget in MiB of the sm90 backward's tile order with a mask (Q and dO of the (batch, key/value head)
    /// pairs of one group). Default 24.
    pub bwd90_l2_group_mib: u64,
    /// Pipeline stages of the KV-cache kernel (`KV_STAGES`, a compile-time constant: each value is its own
    /// kernel and cache entry): `None` takes 3 up to head dim 128 and 2 above; `Some(n)` uses `n`, clamped to
    /// 2..=8. Default `None`.
    pub kv_stages: Option<u32>,
    /// Key splits of a KV-cache call, as FlashAttention's `num_splits`: 0 chooses them from the problem and the
    /// device (the default); `n > 0` uses `n`, clamped to the kernel's maximum.
    pub num_splits: usize,
    /// Extra NVRTC options appended to every kernel compilation of the call (e.g. `-lineinfo` for source-level
    /// profiling, or a `-D` define of a kernel experiment). They are part of each kernel's cache key, so every
    /// distinct list is compiled and cached separately. Default empty.
    pub nvrtc_options: Vec<String>,
    /// Test hook: every output buffer the call writes (o, lse, dq, dk, dv) is filled with NaN before the kernels
    /// run, so an element a kernel forgets to write fails an accuracy check. `cuda::set_poison_outputs` turns
    /// the same on for the whole process. On the CPU, `kvcache_forward` allocates its `o` and `lse` NaN-filled
    /// (the other CPU entry points write into the caller's buffers). Default `false`.
    pub poison_outputs: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cuda_path: CudaPath::Auto,
            bwd_path: CudaPath::Auto,
            sm90_d64_bm192: true,
            sm90_wide_kv_d128: None,
            sm90_wide_kv_d256: None,
            sm90_l2_group_mib: None,
            sm90_pingpong: true,
            bwd90_l2_group_mib: 24,
            kv_stages: None,
            num_splits: 0,
            nvrtc_options: Vec::new(),
            poison_outputs: false,
        }
    }
}

impl Tuning {
    /// Whether the forward may run on the Hopper kernels ([`Self::cuda_path`] is not [`CudaPath::Sm80`]).
    pub fn sm90_forward_allowed(&self) -> bool {
        self.cuda_path != CudaPath::Sm80
    }

    /// Whether the backward may run on the Hopper kernel (neither [`Self::cuda_path`] nor [`Self::bwd_path`]
    /// is [`CudaPath::Sm80`]).
    pub fn sm90_backward_allowed(&self) -> bool {
        self.cuda_path != CudaPath::Sm80 && self.bwd_path != CudaPath::Sm80
    }

    /// The forced width choice of the sm90 forward's wide K/V blocks at a padded head dim (`None`: the rule).
    pub fn sm90_wide_kv(&self, head_dim: usize) -> Option<bool> {
        match head_dim {
            128 => self.sm90_wide_kv_d128,
            256 => self.sm90_wide_kv_d256,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_paths() {
        let t = Tuning::default();
        assert!(t.sm90_forward_allowed() && t.sm90_backward_allowed());
        assert!(t.sm90_d64_bm192 && t.sm90_pingpong && t.bwd90_l2_group_mib == 24 && t.num_splits == 0);
        let bwd80 = Tuning { bwd_path: CudaPath::Sm80, ..Tuning::default() };
        assert!(bwd80.sm90_forward_allowed() && !bwd80.sm90_backward_allowed());
        let all80 = Tuning { cuda_path: CudaPath::Sm80, ..Tuning::default() };
        assert!(!all80.sm90_forward_allowed() && !all80.sm90_backward_allowed());
        assert_eq!("SM80".parse::<CudaPath>().unwrap(), CudaPath::Sm80);
        assert_eq!(" auto ".parse::<CudaPath>().unwrap(), CudaPath::Auto);
        assert!("sm90".parse::<CudaPath>().is_err());
        let wide = Tuning { sm90_wide_kv_d256: Some(true), ..Tuning::default() };
        assert_eq!((wide.sm90_wide_kv(128), wide.sm90_wide_kv(256), wide.sm90_wide_kv(64)), (None, Some(true), None));
    }
}
