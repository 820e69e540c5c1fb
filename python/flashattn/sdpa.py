"""PyTorch's ``F.scaled_dot_product_attention`` on flashattn's kernels.

    import flashattn.sdpa
    flashattn.sdpa.activate()      # SDPA's flash backend now runs flashattn (CUDA tensors, forward and backward)
    ...
    flashattn.sdpa.restore()       # back to PyTorch's own FlashAttention-2 kernels

``activate()`` registers the implementation ``"flashattn"`` with ``torch.nn.attention.register_flash_attention_impl``
and activates it with ``activate_flash_attention_impl`` (PyTorch >= 2.11): the CUDA kernels of
``aten::_scaled_dot_product_flash_attention`` and its backward are replaced by ours, so every SDPA call that
PyTorch routes to its flash backend (``nn.MultiheadAttention``, models on ``attn_implementation="sdpa"``,
``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``) runs flashattn. PyTorch still chooses the backend: calls it sends to
cuDNN, the memory-efficient kernel or the math path are not affected, and CPU tensors never reach this module.

Refused (``RuntimeError`` from the SDPA call, as PyTorch raises for an unsupported configuration): dropout,
``return_debug_mask``, and a value head dim other than the query's.
"""

from __future__ import annotations

import torch

from . import _ops

NAME = "flashattn"

#: How many times each replaced operator ran (proof of which kernels served an SDPA call).
calls = {"forward": 0, "backward": 0}


def _refuse(what: str) -> None:
    raise RuntimeError(f"flashattn SDPA backend: {what}")


def _forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """`aten::_scaled_dot_product_flash_attention` on (batch, heads, seqlen, head dim) tensors."""
    if dropout_p != 0.0:
        _refuse(f"dropout is not supported (dropout_p={dropout_p})")
    if return_debug_mask:
        _refuse("return_debug_mask is not supported")
    if value.size(-1) != query.size(-1):
        _refuse(f"value head dim {value.size(-1)} differs from the query's {query.size(-1)}")
    # Our kernels take (batch, seqlen, heads, head dim) with any strides: transposed views, no copy. The output
    # is allocated like the query (empty_like of its transposed view keeps the query's dimension order), as
    # PyTorch's own kernel and its meta function do.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    out, lse = _ops._fwd_impl(q, k, v, None, None, None, None, 0, 0, scale, bool(is_causal), -1, -1, 0.0, False)
    calls["forward"] += 1
    dev = query.device
    seed = torch.empty(2, dtype=torch.uint64, device=dev)
    offset = torch.empty((), dtype=torch.uint64, device=dev)
    debug = torch.empty(0, dtype=query.dtype, device=dev)
    return out.transpose(1, 2), lse, None, None, query.size(2), key.size(2), seed, offset, debug


def _backward(
    grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    philox_seed, philox_offset, *, scale=None,
):  # fmt: skip
    """`aten::_scaled_dot_product_flash_attention_backward`: gradients laid out like the inputs (as its meta)."""
    if dropout_p != 0.0:
        _refuse(f"dropout is not supported (dropout_p={dropout_p})")
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    _ops._bwd_into(
        (t(dq), t(dk), t(dv)), t(grad_out), t(query), t(key), t(value), t(out), logsumexp, None, None, None, None,
        0, 0, scale, bool(is_causal), -1, -1, 0.0, torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    calls["backward"] += 1
    return dq, dk, dv


class _Handle:
    """What ``activate_flash_attention_impl`` keeps alive; ``remove`` drops the overrides."""

    def __init__(self, lib):
        self.lib = lib

    def remove(self) -> None:
        if self.lib is not None:
            self.lib._destroy()
            self.lib = None


def _register() -> _Handle:
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_scaled_dot_product_flash_attention", _forward, "CUDA")
    lib.impl("_scaled_dot_product_flash_attention_backward", _backward, "CUDA")
    return _Handle(lib)


def _api():
    import torch.nn.attention as attn

    if not hasattr(attn, "register_flash_attention_impl"):
        raise RuntimeError(
            "flashattn.sdpa needs PyTorch >= 2.11 (torch.nn.attention.register_flash_attention_impl), "
            f"this is {torch.__version__}"
        )
    return attn


def activate() -> str:
    """Registers (once) and activates flashattn as SDPA's flash backend; returns the name it registered."""
    attn = _api()
    if NAME not in attn.list_flash_attention_impls():
        attn.register_flash_attention_impl(NAME, register_fn=_register)
    attn.activate_flash_attention_impl(NAME)
    return NAME


def restore() -> None:
    """PyTorch's own flash kernels again (``torch.nn.attention.restore_flash_attention_impl``)."""
    attn = _api()
    if attn.current_flash_attention_impl() == NAME:
        attn.restore_flash_attention_impl()


def active() -> bool:
    """Whether flashattn is SDPA's active flash backend."""
    attn = _api()
    return attn.current_flash_attention_impl() == NAME
