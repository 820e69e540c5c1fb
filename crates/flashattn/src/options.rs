//! The one options type of the attention calls, with FlashAttention's defaults.

use crate::dtype::DType;
use crate::tensor::Tensor;
use crate::tuning::Tuning;

/// Variable-length batches: sequences packed along the first dimension of `q` (`[total_q, h, d]`) and
/// `k`/`v` (`[total_k, hk, d]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VarLen {
    /// `[b + 1]`, non-decreasing, starting at 0, ending at `total_q`.
    pub cu_seqlens_q: Vec<i32>,
    /// `[b + 1]`, non-decreasing, starting at 0, ending at `total_k`.
    pub cu_seqlens_k: Vec<i32>,
    /// `[b]`: only the first `seqused_k[i]` keys of sequence `i` are used.
    pub seqused_k: Option<Vec<i32>>,
}

/// Options of a forward or backward attention call. `AttnOptions::default()` is plain softmax attention
/// with scale `1/sqrt(d)`.
///
/// ```
/// let opts = flashattn::AttnOptions::default().causal().window(256, 0).softcap(30.0);
/// assert!(opts.causal && opts.window == (256, 0));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttnOptions {
    /// Softmax scale; `None` means `1/sqrt(d)`. Must be finite.
    pub softmax_scale: Option<f32>,
    /// Causal mask, aligned to the bottom-right corner. Same as `window = (-1, 0)`.
    pub causal: bool,
    /// Sliding window `(left, right)`; `-1` on a side means unbounded. With `causal`, right is 0.
    pub window: (i64, i64),
    /// ALiBi slopes, `f32`, shape `[h]` or `[b, h]`.
    pub alibi_slopes: Option<Tensor>,
    /// Soft-capping of scores: `s = softcap * tanh(s / softcap)` when `> 0`; 0 turns it off.
    pub softcap: f32,
    /// Variable-length batches.
    pub varlen: Option<VarLen>,
    /// Backward only: make dQ/dK/dV bit-reproducible run to run (CPU results always are).
    pub deterministic: bool,
    /// Learnable sink (gpt-oss style): one logit per query head, `[h]`, `f32`/`f16`/`bf16`, that joins each
    /// row's softmax denominator and carries no value. A row with no visible key gives `o = 0`, `lse = sink`.
    /// CPU backends only for now.
    pub sink: Option<Tensor>,
    /// FP8 inputs: the descale factor of `q` (`f32`, `[b, hk]`, FlashAttention-3's convention; default 1).
    /// Query head `i` of sequence `s` uses `q_descale[s, i / (h / hk)]`: the values used are `q * q_descale`.
    /// Only with an `e4m3` q (forward only; CPU backends for now).
    pub q_descale: Option<Tensor>,
    /// FP8 inputs: the descale factor of `k` (or `k_cache`), `f32` `[b, hk]`, default 1; the values used are
    /// `k * k_descale`. With an `e4m3` cache, 16-bit `k_new` rows are stored as `round_e4m3(k_new / k_descale)`.
    pub k_descale: Option<Tensor>,
    /// FP8 inputs: the descale factor of `v` (or `v_cache`), as [`AttnOptions::k_descale`].
    pub v_descale: Option<Tensor>,
    /// The dtype of `o`. FP8 inputs: bf16 or f16 (default: bf16 when q is `e4m3`, q's dtype when only the KV
    /// cache is). Other inputs: f32 (partial outputs that a caller merges before one rounding, as ring attention
    /// does; the forward only: not the KV-cache path nor ring attention) or none, q's dtype. The backward reads
    /// `o` in the inputs' dtype whatever this says.
    pub out_dtype: Option<DType>,
    /// Dispatch and tuning choices of the CUDA backend (kernel path, tile shapes, split counts, extra NVRTC
    /// options, test hooks); the default is the library's chosen behaviour. The CPU backends ignore it.
    pub tuning: Tuning,
}

impl Default for AttnOptions {
    fn default() -> Self {
        AttnOptions {
            softmax_scale: None,
            causal: false,
            window: (-1, -1),
            alibi_slopes: None,
            softcap: 0.0,
            varlen: None,
            deterministic: false,
            sink: None,
            q_descale: None,
            k_descale: None,
            v_descale: None,
            out_dtype: None,
            tuning: Tuning::default(),
        }
    }
}

impl AttnOptions {
    /// Turns on the causal mask.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }
    /// Sets a sliding window (`-1` = unbounded side).
    pub fn window(mut self, left: i64, right: i64) -> Self {
        self.window = (left, right);
        self
    }
    /// Sets the softmax scale.
    pub fn scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
    /// Sets soft-capping.
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = cap;
        self
    }
    /// Sets ALiBi slopes (`f32`, `[h]` or `[b, h]`).
    pub fn alibi(mut self, slopes: Tensor) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    /// Sets variable-length batches.
    pub fn varlen(mut self, varlen: VarLen) -> Self {
        self.varlen = Some(varlen);
        self
    }
    /// Requests a deterministic backward pass.
    pub fn deterministic(mut self) -> Self {
        self.deterministic = true;
        self
    }
    /// Sets the CUDA backend's dispatch and tuning choices.
    pub fn tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }
    /// Sets a learnable sink (`[h]`, one logit per query head).
    pub fn sink(mut self, sink: Tensor) -> Self {
        self.sink = Some(sink);
        self
    }
    /// Sets the FP8 descale factors of q, k and v (`f32`, `[b, hk]` each; `None` = 1).
    pub fn descale(mut self, q: Option<Tensor>, k: Option<Tensor>, v: Option<Tensor>) -> Self {
        self.q_descale = q;
        self.k_descale = k;
        self.v_descale = v;
        self
    }
    /// Sets the output dtype (see [`AttnOptions::out_dtype`]).
    pub fn out_dtype(mut self, dtype: DType) -> Self {
        self.out_dtype = Some(dtype);
        self
    }
}
