"""The three operators (`torch.library`, namespace ``flashattn``) behind the public functions.

Each op has a real implementation (the Rust extension over the tensors' own memory), a fake one (shapes only,
for ``torch.compile`` and meta tensors) and, for the forward, an autograd formula. Tensors are handed to the
extension as ``(address, dtype, shape, strides)``: nothing is copied, and on CUDA the call runs on the
tensors' device and that device's current stream, with every piece of metadata read from device memory and
scratch from torch's caching allocator.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import _flashattn as _ext

_log = logging.getLogger("flashattn")

_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.int32: "i32"}


def _desc(t: torch.Tensor, name: str):
    dt = _DTYPES.get(t.dtype)
    if dt is None:
        raise TypeError(
            f"invalid argument `{name}`: expected dtype float16, bfloat16, float32 (CPU only) or int32 "
            f"(metadata), got {t.dtype}"
        )
    return (t.data_ptr(), dt, tuple(t.shape), tuple(t.stride()))


def _opt(t: Optional[torch.Tensor], name: str):
    return None if t is None else _desc(t, name)


def _device(t: torch.Tensor) -> int:
    return -1 if t.device.type == "cpu" else t.device.index


def _stream(t: torch.Tensor) -> int:
    """The current CUDA stream of `t`'s device, as a raw handle (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


# torch's own fast accessor of the current stream (what its compiler's generated code calls), when present.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _check_device(ref: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Every tensor on `ref`'s device (a CPU tensor of metadata with CUDA `q` is refused too)."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"invalid argument `{name}`: expected a tensor on {ref.device} (as q), got one on {t.device}"
            )


def _check_small(q: torch.Tensor, alibi: Optional[torch.Tensor], sink: Optional[torch.Tensor]) -> None:
    """The per-head vectors on q's device (the extension sees addresses only), for direct calls of the ops."""
    if alibi is not None or sink is not None:
        _check_device(q, alibi_slopes=alibi, learnable_sink=sink)


def _outputs(q: torch.Tensor, varlen: bool):
    """`out` (q's shape and dtype) and `lse` (float32 `(b, h, sq)`, varlen `(h, total_q)`), allocated like q (real
    tensors for the implementations, fake ones for the fakes)."""
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    # empty_like (as FlashAttention-2 allocates out): q's strides where q is dense, else contiguous.
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def _opts(scale, causal, wl, wr, softcap, deterministic=False):
    return (
        None if scale is None else float(scale),
        bool(causal),
        int(wl),
        int(wr),
        float(softcap),
        bool(deterministic),
    )


def _varlen(cu_q, cu_k, seqused_k, max_sq, max_sk):
    if cu_q is None:
        return None
    return (
        _desc(cu_q, "cu_seqlens_q"),
        _desc(cu_k, "cu_seqlens_k"),
        _opt(seqused_k, "seqused_k"),
        int(max_sq),
        int(max_sk),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_small(q, alibi_slopes, sink)
    out, lse = _outputs(q, cu_seqlens_q is not None)
    _ext.fwd(
        _device(q),
        _stream(q),
        _desc(q, "q"),
        _desc(k, "k"),
        _desc(v, "v"),
        _desc(out, "out"),
        _desc(lse, "softmax_lse"),
        _opts(softmax_scale, causal, window_left, window_right, softcap),
        _opt(alibi_slopes, "alibi_slopes"),
        _varlen(cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k),
        _opt(sink, "learnable_sink"),
    )
    return out, lse


fwd = torch.library.custom_op("flashattn::fwd", _fwd_impl, mutates_args=())


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, cu_seqlens_q, *args):
    return _outputs(q, cu_seqlens_q is not None)


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
    _check_small(q, alibi_slopes, sink)
    dsink = _dsink_like(sink, q)
    _bwd_into(
        (dq, dk, dv), dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
        max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, deterministic, sink, dsink,
    )  # fmt: skip
    return dq, dk, dv, dsink


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
    opts = _opts(softmax_scale, causal, window_left, window_right, softcap, deterministic)
    alibi = _opt(alibi_slopes, "alibi_slopes")
    vl = _varlen(cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    dev = _device(q)
    qd, kd, vd = _desc(q, "q"), _desc(k, "k"), _desc(v, "v")
    ws_bytes = _ext.bwd_workspace_bytes(dev, qd, kd, vd, opts, alibi, vl)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device) if ws_bytes else None
    _ext.bwd(
        dev,
        _stream(q),
        [
            qd,
            kd,
            vd,
            _desc(out, "out"),
            _desc(lse, "softmax_lse"),
            _desc(dout, "dout"),
            _desc(dq, "dq"),
            _desc(dk, "dk"),
            _desc(dv, "dv"),
        ],
        opts,
        alibi,
        vl,
        (0, 0) if ws is None else (ws.data_ptr(), ws_bytes),
        _opt(sink, "learnable_sink"),
        _opt(dsink, "dsink"),
        bool(whole_rows),
    )


bwd = torch.library.custom_op("flashattn::bwd", _bwd_impl, mutates_args=())


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, *args):
    sink = args[12] if len(args) > 12 else None
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), _dsink_like(sink, q)


def _save(ctx, args, out, lse):
    """What the backward needs of a forward call with `fwd`'s arguments `args` (both autograd paths)."""
    q, k, v, alibi, cu_q, cu_k, used = args[:7]
    sink = args[15] if len(args) > 15 else None
    ctx.save_for_backward(q, k, v, out, lse, alibi, cu_q, cu_k, used, sink)
    ctx.args = args[7:15]


def _grads(ctx, dout, backward):
    """`fwd`'s input gradients through `backward` (the `bwd` op, or its implementation on the eager path)."""
    q, k, v, out, lse, alibi, cu_q, cu_k, used, sink = ctx.saved_tensors
    dq, dk, dv, dsink = backward(dout, q, k, v, out, lse, alibi, cu_q, cu_k, used, *ctx.args, sink)
    return (dq, dk, dv) + (None,) * 12 + (dsink if sink is not None else None,)


fwd.register_autograd(
    lambda ctx, dout, dlse: _grads(ctx, dout, bwd),
    setup_context=lambda ctx, inputs, output: _save(ctx, inputs, *output),
)


# --- KV cache ------------------------------------------------------------------------------------------------


_kv_ws_bytes: dict = {}


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
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_small(q, alibi_slopes, sink)
    out, lse = _outputs(q, False)
    rotary = None
    if rotary_cos is not None:
        rotary = (_desc(rotary_cos, "rotary_cos"), _desc(rotary_sin, "rotary_sin"), bool(rotary_interleaved))
    kv = (
        _desc(k_cache, "k_cache"),
        _desc(v_cache, "v_cache"),
        _opt(k, "k"),
        _opt(v, "v"),
        _desc(cache_seqlens, "cache_seqlens"),
        _opt(block_table, "block_table"),
        _opt(cache_batch_idx, "cache_batch_idx"),
        _opt(cache_leftpad, "cache_leftpad"),
        rotary,
    )
    opts = _opts(softmax_scale, causal, window_left, window_right, softcap)
    alibi = _opt(alibi_slopes, "alibi_slopes")
    dev = _device(q)
    qd, od, ld = _desc(q, "q"), _desc(out, "out"), _desc(lse, "softmax_lse")
    # The size depends on shapes, options and the device only: remembered per such key.
    key = (
        dev,
        qd[1:],
        tuple(None if x is None else x[1:] for x in kv[:8]),
        kv[8] and (kv[8][0][1:], kv[8][2]),
        opts,
        alibi and alibi[1:],
    )
    ws_bytes = _kv_ws_bytes.get(key)
    if ws_bytes is None:
        ws_bytes = _kv_ws_bytes[key] = _ext.kvcache_workspace_bytes(dev, qd, kv, od, ld, opts, alibi)
    # Uninitialised: the extension zeroes the workspace's header (status word, split counters) on the stream.
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device) if ws_bytes else None
    _ext.kvcache(
        dev, _stream(q), qd, kv, od, ld, opts, alibi, (0, 0) if ws is None else (ws.data_ptr(), ws_bytes),
        _opt(sink, "learnable_sink"),
    )  # fmt: skip
    return out, lse


kvcache = torch.library.custom_op("flashattn::kvcache", _kvcache_impl, mutates_args=("k_cache", "v_cache"))


@kvcache.register_fake
def _kvcache_fake(q, *args):
    return _outputs(q, False)


# --- eager calls -----------------------------------------------------------------------------------------------
# The custom ops are what torch.compile, fake tensors, dispatch modes and opcheck see. A plain eager call on real
# CPU or CUDA tensors runs the same implementations directly (an autograd.Function where gradients are needed):
# the dispatcher's Python layers cost more than the kernel launch itself at decode sizes.

_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def _eager(*ts: torch.Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and all(type(t) is torch.Tensor for t in ts)
        and not ts[0].is_meta
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
        return _Attention.apply(*args)
    return _fwd_impl(*args)


def attention_kvcache(*args):
    """`kvcache`'s arguments, likewise (the caches' version counters are bumped as the op's would be)."""
    q, k_cache, v_cache = args[0], args[1], args[2]
    if not _eager(q, k_cache, v_cache):
        return kvcache(*args)
    out = _kvcache_impl(*args)
    if _increment_version is not None:
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
