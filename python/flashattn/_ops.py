"""The three operators (`torch.library`, namespace ``flashattn``) behind the public functions.

Each op has a real implementation (the Rust extension over the tensors' own memory), a fake one (shapes only,
for ``torch.compile`` and meta tensors) and, for the forward, an autograd formula. The implementations hand the
tensors themselves to the extension, which reads and checks each one (address, dtype, shape, strides, device)
in a single call: nothing is copied, and on CUDA the call runs on the tensors' device and that device's
current stream, with every piece of metadata read from device memory and scratch from torch's caching
allocator. The Python side allocates the outputs and nothing else: at decode sizes the host time of a call is
the whole cost.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import _flashattn as _ext

_log = logging.getLogger("flashattn")


_FP8 = getattr(torch, "float8_e4m3fn", None)


def out_dtype_of(q: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """`out`'s dtype: `out_dtype` when given (FP8 inputs: bfloat16 or float16), else bfloat16 for an FP8 q
    (FlashAttention-3's choice), else q's."""
    if out_dtype is not None:
        return out_dtype
    return torch.bfloat16 if q.dtype == _FP8 else q.dtype


def _outputs(q: torch.Tensor, v: torch.Tensor, varlen: bool, out_dtype: Optional[torch.dtype] = None):
    """`out` (q's shape with v's head dim last, q's dtype or `out_dtype_of`'s) and `lse` (float32 `(b, h, sq)`,
    varlen `(h, total_q)`), allocated like q (real tensors for the implementations, fake ones for the fakes)."""
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = q.new_empty(lse_shape, dtype=torch.float32)
    dtype = out_dtype_of(q, out_dtype)
    if v.shape[-1] == q.shape[-1]:
        # empty_like (as FlashAttention-2 allocates out): q's strides where q is dense, else contiguous.
        return torch.empty_like(q, dtype=dtype), lse
    # A value head dim of its own (d_v != d): a contiguous out of q's shape with v's last dim.
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=dtype), lse


def _refuse_fp8_grad(*tensors) -> None:
    """FP8 inputs are forward-only: an FP8 tensor that requires grad raises (as torch does for an operation
    without a derivative) before anything runs."""
    for name, t in zip(("q", "k", "v"), tensors):
        if t is not None and t.dtype == _FP8 and t.requires_grad:
            raise RuntimeError(
                f"flashattn: FP8 (float8_e4m3fn) inputs are forward-only: `{name}` requires grad, and the "
                "backward pass takes float16, bfloat16 or float32; detach it or run under torch.no_grad()"
            )


# --- forward -------------------------------------------------------------------------------------------------


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    sink: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _outputs(q, v, cu_seqlens_q is not None, out_dtype)
    shared = (
        alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        window_left, window_right, softcap,
    )  # fmt: skip
    _ext.fwd((q, k, v, out, lse), shared, _device_sink(sink), q_descale, k_descale, v_descale, out_dtype is not None)
    return out, lse


fwd = torch.library.custom_op("flashattn::fwd", _fwd_impl, mutates_args=())


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, cu_seqlens_q, *args):
    out_dtype = args[14] if len(args) > 14 else None
    return _outputs(q, v, cu_seqlens_q is not None, out_dtype)


# --- backward ------------------------------------------------------------------------------------------------


def _bwd_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    sink: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Key rows past seqused_k get no gradient: they stay zero.
    make = torch.zeros if seqused_k is not None else torch.empty
    dk = make(k.shape, dtype=k.dtype, device=k.device)
    dv = make(v.shape, dtype=v.dtype, device=v.device)
    dsink = _dsink_like(sink, q)
    _bwd_into(
        (dq, dk, dv), dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
        max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, deterministic, sink, dsink,
    )  # fmt: skip
    return dq, dk, dv, dsink


def _device_sink(sink: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sink as the CUDA kernels read it, float32 `[h]` contiguous (a model's bf16 parameter is converted, a
    float32 one passed as it is); CPU tensors go as they are (the CPU backend reads any float dtype)."""
    if sink is None or not sink.is_cuda:
        return sink
    return sink.to(torch.float32).contiguous()


def _dsink_like(sink: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """The sink's gradient buffer (an empty tensor without a sink: an op's outputs are always tensors)."""
    return sink.new_empty(sink.shape) if sink is not None else q.new_empty(0)


def _bwd_into(
    grads, dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
    softmax_scale, causal, window_left, window_right, softcap, deterministic, sink=None, dsink=None,
    whole_rows=True,
) -> None:  # fmt: skip
    """The backward into caller-allocated `grads` = (dq, dk, dv) (any strides with a contiguous last dim) and,
    with a sink, its gradient into `dsink`. `whole_rows=False`: `out` and `lse` belong to more keys than `k`
    holds (a ring attention chunk pair; see the extension's `bwd`)."""
    dq, dk, dv = grads
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # The CUDA kernels read the sink and write its gradient as float32 [h]; a 16-bit sink gets its gradient
    # rounded once, at the end.
    dsink_out = dsink
    if sink is not None and sink.is_cuda:
        sink = _device_sink(sink)
        if dsink is not None and (dsink.dtype != torch.float32 or not dsink.is_contiguous()):
            dsink = torch.empty(dsink.shape, dtype=torch.float32, device=dsink.device)
    shared = (
        alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        window_left, window_right, softcap,
    )  # fmt: skip
    _ext.bwd(dout, (q, k, v, out, lse), dq, dk, dv, shared, deterministic, sink, dsink, bool(whole_rows))
    if dsink_out is not dsink:
        dsink_out.copy_(dsink)


bwd = torch.library.custom_op("flashattn::bwd", _bwd_impl, mutates_args=())


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, *args):
    sink = args[12] if len(args) > 12 else None
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), _dsink_like(sink, q)


def _save(ctx, args, out, lse):
    """What the backward needs of a forward call with `fwd`'s arguments `args` (both autograd paths)."""
    q, k, v, alibi, cu_q, cu_k, used = args[:7]
    _refuse_fp8_grad(q, k, v)
    sink = args[15] if len(args) > 15 else None
    ctx.save_for_backward(q, k, v, out, lse, alibi, cu_q, cu_k, used, sink)
    ctx.args = args[7:15]
    ctx.n_args = len(args)


def _grads(ctx, dout, backward):
    """`fwd`'s input gradients through `backward` (the `bwd` op, or its implementation on the eager path)."""
    q, k, v, out, lse, alibi, cu_q, cu_k, used, sink = ctx.saved_tensors
    dq, dk, dv, dsink = backward(dout, q, k, v, out, lse, alibi, cu_q, cu_k, used, *ctx.args, sink)
    # None for the other arguments: metadata, options, the sink's slot below, the descales and out_dtype (as many
    # as the call had: the op always has them all, a direct call may stop after the sink).
    grads = (dq, dk, dv) + (None,) * 12 + (dsink if sink is not None else None,) + (None,) * 4
    return grads[: ctx.n_args]


fwd.register_autograd(
    lambda ctx, dout, dlse: _grads(ctx, dout, bwd),
    setup_context=lambda ctx, inputs, output: _save(ctx, inputs, *output),
)


# --- KV cache ------------------------------------------------------------------------------------------------


def _kvcache_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    rotary_cos: Optional[torch.Tensor],
    rotary_sin: Optional[torch.Tensor],
    rotary_interleaved: bool,
    alibi_slopes: Optional[torch.Tensor],
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    sink: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # out and lse in q's dtype are allocated by the extension (one fewer round of reading them back); an FP8 q or
    # an out_dtype gets them from _outputs.
    out = lse = None
    if out_dtype is not None or q.dtype is _FP8:
        out, lse = _outputs(q, v_cache, False, out_dtype)
    return _ext.kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, rotary_cos,
        rotary_sin, rotary_interleaved, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
        _device_sink(sink), out, lse, num_splits, q_descale, k_descale, v_descale, out_dtype is not None,
    )  # fmt: skip


kvcache = torch.library.custom_op("flashattn::kvcache", _kvcache_impl, mutates_args=("k_cache", "v_cache"))


@kvcache.register_fake
def _kvcache_fake(q, k_cache, v_cache, *args):
    out_dtype = args[20] if len(args) > 20 else None
    return _outputs(q, v_cache, False, out_dtype)


# --- eager calls -----------------------------------------------------------------------------------------------
# The custom ops are what torch.compile, fake tensors, dispatch modes and opcheck see. A plain eager call on real
# CPU or CUDA tensors runs the same implementations directly (an autograd.Function where gradients are needed):
# the dispatcher's Python layers cost more than the kernel launch itself at decode sizes.

_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor


def _eager(q, k, v) -> bool:
    return (
        not _is_compiling()
        and type(q) is _Tensor
        and type(k) is _Tensor
        and type(v) is _Tensor
        and not q.is_meta
        and _dispatch_depth() == 0
        and not _functorch_active()
    )


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        out, lse = _fwd_impl(*args)
        _save(ctx, args, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, _bwd_impl)


def attention(*args):
    """`fwd`'s arguments: the op under torch.compile and dispatch modes, else the implementation directly."""
    q, k, v = args[0], args[1], args[2]
    if not _eager(q, k, v):
        return fwd(*args)
    sink = args[15] if len(args) > 15 else None
    if torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (sink is not None and sink.requires_grad)
    ):
        _refuse_fp8_grad(q, k, v)
        return _Attention.apply(*args)
    return _fwd_impl(*args)


def attention_kvcache(*args):
    """`kvcache`'s arguments, likewise (an append bumps the caches' version counters as the op would)."""
    q, k_cache, v_cache = args[0], args[1], args[2]
    if not _eager(q, k_cache, v_cache):
        return kvcache(*args)
    out = _kvcache_impl(*args)
    if args[3] is not None and _increment_version is not None:
        _increment_version(k_cache)
        _increment_version(v_cache)
    return out


# --- first-call compile notice --------------------------------------------------------------------------------

_compiles = 0


def _on_compile(variant: str, cache_file: str) -> None:
    global _compiles
    _compiles += 1
    if _compiles == 1:
        _log.warning(
            "flashattn: compiling the kernel %s with NVRTC (first use of this variant, about a second; cached in "
            "%s for later runs). flashattn.precompile() fills the cache ahead of time.",
            variant,
            cache_file.rsplit("/", 1)[0],
        )
    else:
        _log.info("flashattn: compiling the kernel %s", variant)


_ext.set_compile_hook(_on_compile)
