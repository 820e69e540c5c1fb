"""Run code written for FlashAttention-2 unchanged: ``import flash_attn`` resolves to this package.

    import flashattn.compat
    flashattn.compat.install()
    from flash_attn import flash_attn_func          # ours

or, for a script that must not change at all::

    python -m flashattn.compat script.py [args...]

What resolves after :func:`install`: ``flash_attn`` (the seven functions of FlashAttention-2's interface),
``flash_attn.flash_attn_interface`` (the same), ``flash_attn.bert_padding`` (``pad_input``, ``unpad_input``,
``index_first_axis``, ``index_put_first_axis``) and ``flash_attn.layers.rotary`` (``apply_rotary_emb``), the last
two written here in plain torch. A real ``flash_attn`` that is already imported is never replaced: ``install``
raises instead. Package-metadata queries (``importlib.metadata.version("flash_attn")``) still see no
distribution: this is an import-level drop-in, not an installed package.
"""

from __future__ import annotations

import sys
import types
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import interface

#: The FlashAttention-2 version whose API this mirrors (libraries compare it against minimum versions).
FLASH_ATTN_API_VERSION = "2.8.3"

_FUNCTIONS = (
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
)

_MARK = "__flashattn_compat__"


# --- flash_attn.bert_padding ----------------------------------------------------------------------------------


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``x``'s first axis (``x[indices]``), differentiable."""
    return x.index_select(0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero tensor of ``first_axis_dim`` rows with ``values`` written at rows ``indices``, differentiable."""
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, indices, values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: Optional[torch.Tensor] = None):
    """Packs the tokens a ``(batch, seqlen)`` mask keeps into ``(total, ...)`` rows.

    ``unused_mask`` marks tokens that are kept in the packed layout but not attended to. Returns ``(packed,
    indices, cu_seqlens, max_seqlen, seqused)``: the kept rows, their indices into the flattened ``(batch *
    seqlen)`` axis, int32 offsets ``(batch + 1,)``, the longest kept sequence (a Python int: this reads the
    device, as FlashAttention-2's does), and int32 ``(batch,)`` counts of attended tokens.
    """
    keep = attention_mask if unused_mask is None else (attention_mask + unused_mask)
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: ``(total, ...)`` rows back to ``(batch, seqlen, ...)``, zeros elsewhere."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


# --- flash_attn.layers.rotary -----------------------------------------------------------------------------------


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(batch, seqlen, nheads, headdim)`` (or ``(total, nheads, headdim)`` with
    ``cu_seqlens``) by ``cos``/``sin`` ``(seqlen_ro, rotary_dim / 2)``: the first ``rotary_dim`` dims of each
    head rotate, as pairs ``(i, i + rotary_dim / 2)`` or, ``interleaved``, ``(2i, 2i + 1)``; token ``t`` of a
    sequence uses table row ``t + seqlen_offsets`` (an int or an int ``(batch,)`` tensor)."""
    half = cos.shape[-1]
    rot = 2 * half
    if rot > x.shape[-1]:
        raise ValueError(f"invalid argument `cos`: expected rotary_dim <= headdim {x.shape[-1]}, got {rot}")
    if cu_seqlens is None:
        b, s = x.shape[0], x.shape[1]
        pos = torch.arange(s, device=x.device).expand(b, s)
        if isinstance(seqlen_offsets, torch.Tensor):
            pos = pos + seqlen_offsets.to(x.device).long().view(-1, 1)
        else:
            pos = pos + int(seqlen_offsets)
        c, si = cos[pos][:, :, None, :], sin[pos][:, :, None, :]  # (b, s, 1, half)
    else:
        total = x.shape[0]
        starts = cu_seqlens[:-1].long()
        seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=x.device), right=True)
        pos = torch.arange(total, device=x.device) - starts[seq]
        if isinstance(seqlen_offsets, torch.Tensor):
            pos = pos + seqlen_offsets.to(x.device).long()[seq]
        else:
            pos = pos + int(seqlen_offsets)
        c, si = cos[pos][:, None, :], sin[pos][:, None, :]  # (total, 1, half)
    c, si = c.to(torch.float32), si.to(torch.float32)
    xf = x[..., :rot].to(torch.float32)
    if interleaved:
        a, b_ = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * c - b_ * si, a * si + b_ * c), dim=-1).flatten(-2)
    else:
        a, b_ = xf[..., :half], xf[..., half:]
        out = torch.cat((a * c - b_ * si, a * si + b_ * c), dim=-1)
    out = out.to(x.dtype)
    if inplace:
        x[..., :rot].copy_(out)
        return x
    return torch.cat((out, x[..., rot:]), dim=-1) if rot < x.shape[-1] else out


# --- installing the modules -------------------------------------------------------------------------------------


def _module(name: str, doc: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name, doc)
    m.__dict__.update(attrs)
    setattr(m, _MARK, True)
    return m


def install() -> types.ModuleType:
    """Makes ``import flash_attn`` (and its submodules listed above) resolve to this package. Idempotent.
    Raises ``RuntimeError`` if a ``flash_attn`` that is not ours is already imported."""
    existing = sys.modules.get("flash_attn")
    if existing is not None:
        if getattr(existing, _MARK, False):
            return existing
        raise RuntimeError(
            f"a real flash_attn is already imported (from {getattr(existing, '__file__', '?')}): flashattn.compat "
            "does not replace it; call install() before anything imports flash_attn, or uninstall flash-attn"
        )
    funcs = {name: getattr(interface, name) for name in _FUNCTIONS}
    iface = _module("flash_attn.flash_attn_interface", "FlashAttention-2's interface, served by flashattn.", **funcs)
    padding = _module(
        "flash_attn.bert_padding",
        "Padding helpers of FlashAttention-2, in plain torch (flashattn.compat).",
        index_first_axis=index_first_axis,
        index_put_first_axis=index_put_first_axis,
        unpad_input=unpad_input,
        pad_input=pad_input,
    )
    rotary = _module(
        "flash_attn.layers.rotary", "Rotary embedding (flashattn.compat).", apply_rotary_emb=apply_rotary_emb
    )
    layers = _module("flash_attn.layers", "flash_attn.layers (flashattn.compat).", rotary=rotary)
    root = _module(
        "flash_attn",
        "FlashAttention-2's API served by flashattn (flashattn.compat.install()).",
        __version__=FLASH_ATTN_API_VERSION,
        __path__=[],
        flash_attn_interface=iface,
        bert_padding=padding,
        layers=layers,
        **funcs,
    )
    for m in (root, iface, padding, layers, rotary):
        sys.modules[m.__name__] = m
    return root


def uninstall() -> None:
    """Removes the modules :func:`install` added (a real ``flash_attn`` is never touched)."""
    for name in list(sys.modules):
        if (name == "flash_attn" or name.startswith("flash_attn.")) and getattr(sys.modules[name], _MARK, False):
            del sys.modules[name]


def _main(argv: list[str]) -> None:
    import runpy

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m flashattn.compat SCRIPT [ARGS...]\n"
            "runs SCRIPT with `import flash_attn` served by flashattn"
        )
        raise SystemExit(0 if argv else 2)
    install()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    _main(sys.argv[1:])
