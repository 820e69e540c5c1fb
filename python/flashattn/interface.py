"""FlashAttention-2's public functions, with its argument names, order, defaults, layouts and return values.

Tensors are ``(batch, seqlen, nheads, headdim)``; variable-length batches pack sequences as ``(total, nheads,
headdim)`` with ``int32`` ``cu_seqlens`` of ``batch + 1`` offsets (on q's device) and Python-int
``max_seqlen``. CUDA tensors must be float16 or bfloat16; CPU tensors may also be float32. The causal mask is
aligned to the bottom-right corner; ``window_size=(left, right)`` with ``-1`` for an unbounded side.

What this package adds to FlashAttention-2: any head dim 1..256 (not only multiples of 8), any page size for
paged KV caches, ``seqused_k`` on the varlen functions, ``page_table`` as FlashAttention-3's name for
``block_table``, the CPU backend for CPU tensors, and a value head dim of its own (``v`` and ``v_cache``
``(.., headdim_v)``, ``out`` ``(.., headdim_v)``): on CPU tensors any, on CUDA tensors where ``(headdim,
headdim_v)`` pads to (192, 128), (128, 64) or (64, 128), not in a KV cache (others raise
``NotImplementedError``). In a KV cache on CPU tensors, head dims up to 576 and multi-head latent attention's
``v_cache=k_cache[..., :512]`` (a view of the keys' first columns, read without a copy; see
``flash_attn_with_kvcache``). Not there yet: dropout (``dropout_p > 0`` raises ``NotImplementedError``) and a paged
KV cache in the varlen functions. ``num_splits`` of
``flash_attn_with_kvcache`` fixes the number of key splits on CUDA as in FlashAttention (0: the library chooses;
the CPU backend ignores it).

FP8 (an addition, FlashAttention-3's convention; forward only): ``q``, ``k``, ``v`` (or only
``k_cache``/``v_cache`` with a float16/bfloat16 ``q``) may be ``torch.float8_e4m3fn``, each with a descale factor
``q_descale``/``k_descale``/``v_descale`` (float32 ``(batch, nheads_k)``, default 1; query head ``i`` uses
``q_descale[:, i // (nheads // nheads_k)]``): the values used are ``x * x_descale``. ``out`` is bfloat16 (with an
FP8 ``q``; q's dtype with only an FP8 cache), or ``out_dtype=torch.float16``/``torch.bfloat16``. New rows
``k``/``v`` of ``flash_attn_with_kvcache`` appended to an FP8 cache are stored as ``round_e4m3(x / descale)``
(FP8 rows as they are). FP8 tensors that require grad raise ``RuntimeError``. On CUDA tensors
``flash_attn_with_kvcache`` decodes from FP8 caches with a float16/bfloat16 ``q`` (new rows in q's dtype; sm_89 and
newer); FP8 ``q``, ``k``, ``v`` raise ``NotImplementedError`` until the FP8 forward kernels are written.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _ops


def _no_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout is not implemented in flashattn yet: expected dropout_p=0.0, got {dropout_p}"
        )


def _window(window_size: Sequence[int]):
    if type(window_size) is tuple and len(window_size) == 2:
        left, right = window_size
        if type(left) is int and type(right) is int:
            return left, right
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"invalid argument `window_size`: expected a pair (left, right) of ints, got {window_size!r}"
        ) from None
    return left, right


_Tensor = torch.Tensor


def _check_qkv(rank: int, layout: str, q, k, v, names=("q", "k", "v")) -> None:
    """`q`, `k`, `v` tensors of rank `rank` (the common case tested first: this runs on every call)."""
    if (
        type(q) is _Tensor
        and type(k) is _Tensor
        and type(v) is _Tensor
        and q.dim() == rank
        and k.dim() == rank
        and v.dim() == rank
    ):
        return
    _check_tensors(rank, layout, **dict(zip(names, (q, k, v))))


def _check_tensors(rank: int, layout: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"invalid argument `{name}`: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"invalid argument `{name}`: expected rank {rank} {layout}, got shape {tuple(t.shape)}")


def _unpack(name: str, t, dim: int, n: int, layout: str):
    """The `n` tensors packed along `dim` of `t` (views: no copy)."""
    _check_tensors(dim + 3, layout, **{name: t})
    if t.shape[dim] != n:
        raise ValueError(f"invalid argument `{name}`: expected shape {layout}, got {tuple(t.shape)}")
    return t.unbind(dim=dim)


def _num_splits(num_splits) -> int:
    if type(num_splits) is int and num_splits >= 0:
        return num_splits
    raise ValueError(f"invalid argument `num_splits`: expected an int >= 0 (0: automatic), got {num_splits!r}")


def _check_cu(name: str, cu) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"invalid argument `{name}`: expected an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"invalid argument `{name}`: expected dtype int32, got {cu.dtype}")


def _last_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # FlashAttention's rule: only the last dim must be contiguous; any other stride pattern runs as it is.
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _fp8_kwargs(q_descale, k_descale, v_descale, out_dtype) -> dict:
    """The FP8 keyword arguments, passed on by the packed functions."""
    return {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale, "out_dtype": out_dtype}


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(
            f"invalid argument `out_dtype`: expected torch.bfloat16 or torch.float16 (FP8 inputs), got {out_dtype}"
        )


def _attention(
    q, k, v, varlen, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    learnable_sink=None, fp8=(None, None, None, None),
):  # fmt: skip
    """The forward of every non-cache function; `varlen` is `(cu_q, cu_k, seqused_k, max_sq, max_sk)` or None;
    `fp8` is `(q_descale, k_descale, v_descale, out_dtype)`."""
    cu_q, cu_k, used, max_sq, max_sk = varlen or (None, None, None, 0, 0)
    _check_out_dtype(fp8[3])
    wl, wr = _window(window_size)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    out, lse = _ops.attention(
        q,
        k,
        v,
        alibi_slopes,
        cu_q,
        cu_k,
        used,
        int(max_sq),
        int(max_sk),
        softmax_scale,
        bool(causal),
        wl,
        wr,
        float(softcap),
        bool(deterministic),
        learnable_sink,
        *fp8,
    )
    if return_attn_probs:
        # FlashAttention-2 returns the dropout mask's probabilities only with dropout (none here).
        return out, lse, None
    return out


_DENSE = "(batch, seqlen, nheads, headdim)"
_VARLEN = "(total, nheads, headdim) (varlen)"


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """Attention over ``q`` ``(batch, seqlen_q, nheads, headdim)`` and ``k``, ``v`` ``(batch, seqlen_k,
    nheads_k, headdim)`` (``nheads % nheads_k == 0``: MQA/GQA).

    ``alibi_slopes``: float32 ``(nheads,)`` or ``(batch, nheads)``. ``softcap > 0`` caps scores as
    ``softcap * tanh(s / softcap)``. ``deterministic``: the backward is bit-reproducible.
    ``learnable_sink`` (an addition, FlashAttention-4's name; every function takes it): ``(nheads,)`` logits that
    join each row's softmax denominator (gpt-oss); any float dtype; differentiable (its gradient in its dtype).

    Returns ``out`` ``(batch, seqlen_q, nheads, headdim)``; with ``return_attn_probs=True``, ``(out,
    softmax_lse, None)`` with ``softmax_lse`` float32 ``(batch, nheads, seqlen_q)``.
    """
    _no_dropout(dropout_p)
    _check_qkv(4, _DENSE, q, k, v)
    return _attention(
        q, k, v, None, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
        learnable_sink, (q_descale, k_descale, v_descale, out_dtype),
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """``flash_attn_func`` with ``qkv`` packed as ``(batch, seqlen, 3, nheads, headdim)`` (read in place)."""
    q, k, v = _unpack("qkv", qkv, 2, 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
        learnable_sink=learnable_sink,
        **_fp8_kwargs(q_descale, k_descale, v_descale, out_dtype),
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """``flash_attn_func`` with ``kv`` packed as ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    k, v = _unpack("kv", kv, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
        learnable_sink=learnable_sink,
        **_fp8_kwargs(q_descale, k_descale, v_descale, out_dtype),
    )  # fmt: skip


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    seqused_k=None,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """Attention over variable-length sequences packed as ``q`` ``(total_q, nheads, headdim)``, ``k``, ``v``
    ``(total_k, nheads_k, headdim)``; ``cu_seqlens_q``/``cu_seqlens_k`` int32 ``(batch + 1,)`` offsets on q's
    device; ``max_seqlen_q``/``max_seqlen_k`` Python ints (the longest sequences). ``seqused_k`` (int32
    ``(batch,)``, an addition): only the first ``seqused_k[i]`` keys of sequence ``i`` are used.

    Returns ``out`` ``(total_q, nheads, headdim)``; with ``return_attn_probs=True``, ``(out, softmax_lse, None)``
    with ``softmax_lse`` float32 ``(nheads, total_q)``.
    """
    _no_dropout(dropout_p)
    if block_table is not None:
        raise NotImplementedError("a paged KV cache (block_table) in flash_attn_varlen_func is not implemented yet")
    _check_qkv(3, _VARLEN, q, k, v)
    _check_cu("cu_seqlens_q", cu_seqlens_q)
    _check_cu("cu_seqlens_k", cu_seqlens_k)
    if seqused_k is not None:
        _check_cu("seqused_k", seqused_k)
    varlen = (cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    return _attention(
        q, k, v, varlen, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
        learnable_sink, (q_descale, k_descale, v_descale, out_dtype),
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """``flash_attn_varlen_func`` with ``qkv`` packed as ``(total, 3, nheads, headdim)``."""
    q, k, v = _unpack("qkv", qkv, 1, 3, "(total, 3, nheads, headdim)")
    _check_cu("cu_seqlens", cu_seqlens)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        learnable_sink=learnable_sink,
        **_fp8_kwargs(q_descale, k_descale, v_descale, out_dtype),
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """``flash_attn_varlen_func`` with ``kv`` packed as ``(total_k, 2, nheads_k, headdim)``."""
    k, v = _unpack("kv", kv, 1, 2, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        learnable_sink=learnable_sink,
        **_fp8_kwargs(q_descale, k_descale, v_descale, out_dtype),
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    page_table=None,
    learnable_sink=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    out_dtype=None,
):
    """Attention of ``q`` ``(batch, seqlen_q, nheads, headdim)`` over a KV cache, appending ``k``/``v``
    ``(batch, seqlen_new, nheads_k, headdim)`` in place first (at ``cache_seqlens``, rotated by
    ``rotary_cos``/``rotary_sin`` ``(seqlen_ro, rotary_dim / 2)`` when given, q too).

    ``k_cache``/``v_cache``: ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or with ``block_table``
    (int32 ``(batch, max_blocks)``; ``page_table`` is the same) ``(num_blocks, page_size, nheads_k, headdim)``
    with any page size. ``cache_seqlens``: int or int32 ``(batch,)``, tokens already in the cache (``None``: the
    whole cache). ``cache_batch_idx``, ``cache_leftpad``: int32 ``(batch,)``.

    Multi-head latent attention (DeepSeek's MLA, absorbed form: ``headdim`` 576, values the first 512 columns of
    the keys): pass ``v_cache=k_cache[..., :512]``, a view of the same memory (same ``data_ptr`` and strides).
    The values are then read from the key cache without a copy, ``v`` must be None (appending ``k`` appends
    them), rotary is refused (it would turn value columns: rotate the rope columns of ``k`` and ``q`` first), and
    with an FP8 cache ``k_descale`` dequantizes them (``v_descale`` is refused). CPU tensors (head dims up to 576
    in a KV cache); CUDA tensors raise ``NotImplementedError``. A ``v_cache`` that overlaps ``k_cache`` in any
    other way raises ``ValueError``.

    An append that would overflow a sequence's capacity is refused: on the CPU with ``ValueError``; on CUDA,
    where the lengths live in device memory and are not read back, the kernel writes nothing to the cache and
    the output is NaN. ``learnable_sink`` joins the softmax as in ``flash_attn_func``; no gradient
    flows through this function (inference, as FlashAttention's). Returns ``out``, or ``(out, softmax_lse)`` with
    ``return_softmax_lse=True``
    (``softmax_lse`` float32 ``(batch, nheads, seqlen_q)``).
    """
    if page_table is not None:
        if block_table is not None:
            raise ValueError("invalid argument `page_table`: expected it or `block_table`, not both")
        block_table = page_table
    _check_qkv(4, _DENSE, q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    # `k` without `v` is MLA's form (v_cache = k_cache[..., :d_v]: the values come with `k`), which the extension
    # recognises from the tensors' addresses (and refuses otherwise); `v` without `k` is never valid.
    if k is None and v is not None:
        raise ValueError("invalid argument `v`: expected `k` and `v` both given or both None")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(
            "invalid argument `rotary_sin`: expected `rotary_cos` and `rotary_sin` both given or both None"
        )
    # The caches are written in place, so they are never copied: one whose last dim is not contiguous is refused
    # by the extension (ValueError naming it), as FlashAttention does.
    if cache_seqlens is None:
        if block_table is not None:
            full = block_table.shape[1] * k_cache.shape[1]
        else:
            full = k_cache.shape[1]
        cache_seqlens = full
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    wl, wr = _window(window_size)
    _check_out_dtype(out_dtype)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    out, lse = _ops.attention_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens,
        block_table,
        cache_batch_idx,
        cache_leftpad,
        rotary_cos,
        rotary_sin,
        bool(rotary_interleaved),
        alibi_slopes,
        softmax_scale,
        bool(causal),
        wl,
        wr,
        float(softcap),
        learnable_sink,
        _num_splits(num_splits),
        q_descale,
        k_descale,
        v_descale,
        out_dtype,
    )
    return (out, lse) if return_softmax_lse else out
