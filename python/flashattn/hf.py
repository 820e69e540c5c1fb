"""Hugging Face ``transformers`` (5.x) integration: flashattn as an attention implementation.

    import flashattn.hf
    name = flashattn.hf.register()          # "fattn" (== flashattn.hf.ATTN_IMPLEMENTATION)
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    model.set_attn_implementation(name)     # or switch a loaded model

``register()`` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and :func:`attention_mask` to
its ``AttentionMaskInterface`` under one name. The name has no "flash" in it on purpose: transformers 5.x treats
every implementation whose name contains "flash" as a FlashAttention kernel to load from its hub (and refuses it
when that fails), so ``"flashattn"`` cannot be registered.

What transformers passes, and what it becomes here:

* no mask: ``flash_attn_func`` (causal bottom-right, as a KV cache needs: the queries are the last keys);
* a 2D padding mask (our mask function keeps transformers' 2D ``(batch, kv_len)`` mask, as its FlashAttention path
  does): unpad to ``flash_attn_varlen_func`` and repad with zeros;
* static caches: the mask function trims the preallocated, still empty cache slots (see :func:`attention_mask`);
* packed sequences: ``cu_seq_lens_q``/``cu_seq_lens_k`` (+ ``max_length_q``/``max_length_k``) kwargs, or
  ``position_ids`` that restart inside a batch of one (transformers' own rule): ``flash_attn_varlen_func``;
* ``sliding_window=W`` (key j visible to query i when ``i - j < W``): ``window_size=(W - 1, 0)`` when causal,
  ``(W - 1, W - 1)`` otherwise; ``softcap``: ``softcap``; ``scaling``: ``softmax_scale``; GQA/MQA: native.

* ``s_aux`` attention sinks (gpt-oss): ``learnable_sink``, inference and training.

Refused with ``NotImplementedError`` (never a silently different result): attention dropout during training
(``dropout > 0``), 4D/custom masks and mask functions that are not plain causal/sliding/padding (e.g.
bidirectional image-token attention through ``or_mask_function``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .compat import index_first_axis, pad_input, unpad_input
from .interface import flash_attn_func, flash_attn_varlen_func

ATTN_IMPLEMENTATION = "fattn"

__all__ = ["ATTN_IMPLEMENTATION", "attention_forward", "attention_mask", "register"]


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Registers flashattn with transformers' attention and mask interfaces under ``name``; returns ``name``."""
    if "flash" in name:
        raise ValueError(
            f"invalid attention implementation name {name!r}: transformers treats names containing 'flash' as "
            "FlashAttention kernels to fetch from its hub; choose another (the default is "
            f"{ATTN_IMPLEMENTATION!r})"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


# ---------------------------------------------------------------------------------------------------------------
# The mask: transformers calls it once per forward (per mask kind); its result reaches every layer.


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    use_vmap: bool = False,
    **kwargs,
) -> Optional[torch.Tensor]:
    """transformers' FlashAttention mask (the 2D ``(batch, kv)`` padding mask, right-aligned to the keys, or None),
    plus static caches: where the keys are a preallocated buffer longer than the tokens seen so far, a mask of
    length ``q_offset + q_length`` (the slots written) so the attention drops the empty slots.

    The causal/sliding/packing pattern itself is not built here: the kernels apply it from their arguments.
    """
    if use_vmap:
        # transformers sets use_vmap exactly when a model adds its own or/and mask function (bidirectional image
        # tokens, blockwise overlays, ...): a pattern the kernels' causal/window arguments cannot express.
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} supports causal, sliding-window and padding masks only; "
            "this model adds a custom mask function (or_mask_function/and_mask_function). Use 'sdpa' or 'eager'."
        )
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        # The `.all()` is the same host read transformers' FlashAttention mask does.
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            attention_mask = None
        return attention_mask
    # No padding. A static cache returns its whole buffer (kv_length slots) while only q_offset + q_length hold
    # tokens; transformers' FlashAttention path learns that from the 2D mask that `generate` keeps for it (names
    # with "flash" only), here from the cache's offset: a one-element read per forward (not per layer), only
    # where the offset is a tensor (StaticCache keeps it on the device).
    end = int(q_offset) + q_length  # one past the last query's position (absolute)
    if end < kv_offset + kv_length:
        device = kwargs.get("device", "cpu")
        return torch.ones(batch_size, end - kv_offset, dtype=torch.bool, device=device)
    return None


# ---------------------------------------------------------------------------------------------------------------
# The attention.


def _packed_cu_seqlens(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """``cu_seqlens`` of the sequences packed into one row (positions restart), or None when there is one.

    Reads the positions on the host, as transformers' FlashAttention path does (``_is_packed_sequence``)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == pos.min()).flatten()
    if starts.numel() <= 1:
        return None
    total = torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)
    return torch.cat([starts.to(torch.int32), total])


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    cu_seq_lens_k: Optional[torch.Tensor] = None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """transformers' attention signature: ``query`` ``(b, h, sq, d)``, ``key``/``value`` ``(b, hk, sk, d)``;
    returns ``(out (b, sq, h, d), None)``."""
    if dropout:
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r}: attention dropout (dropout={dropout}) is not implemented "
            "in flashattn yet; set the config's attention_dropout to 0 or use 'sdpa'."
        )
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} takes a 2D padding mask (or None), as transformers builds "
            f"it through the registered mask function; got {type(attention_mask).__name__} "
            f"{tuple(getattr(attention_mask, 'shape', ()))}. A custom 4D mask needs 'sdpa' or 'eager'."
        )

    b, _, sq, _ = query.shape
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = (-1, -1)
    if sliding_window is not None:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    opts = dict(
        softmax_scale=scaling,
        causal=causal,
        window_size=window,
        softcap=float(softcap) if softcap is not None else 0.0,
        learnable_sink=s_aux,
    )

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    # float32 activations on CUDA are refused by the kernels (NotImplementedError naming the dtype); the cast to
    # a half dtype that transformers' FlashAttention path makes is not here until it has run on a GPU.
    dv = v.shape[-1]
    if query.is_cuda and dv < q.shape[-1]:
        # The CUDA kernels share one head dim for q, k and v (as FlashAttention's): pad v and crop the output
        # (MLA). The CPU backends take v's own head dim; a wider v on CUDA is refused (NotImplementedError).
        v = torch.nn.functional.pad(v, [0, q.shape[-1] - dv])

    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask.bool(), opts)
    elif cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        out = flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]),
            k.reshape(-1, *k.shape[2:]),
            v.reshape(-1, *v.shape[2:]),
            cu_seq_lens_q.to(torch.int32),
            cu_seq_lens_k.to(torch.int32),
            int(max_length_q) if max_length_q is not None else int(cu_seq_lens_q.diff().max()),
            int(max_length_k) if max_length_k is not None else int(cu_seq_lens_k.diff().max()),
            **opts,
        ).view(b, sq, *q.shape[2:3], -1)
    else:
        cu = None
        # Packing through position_ids: transformers' rule (a batch of one, more than one query, no cache).
        if position_ids is not None and b == 1 and sq > 1 and k.shape[1] == sq:
            cu = _packed_cu_seqlens(position_ids)
        if cu is not None:
            max_len = int(cu.diff().max())
            out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, **opts).unsqueeze(0)
        else:
            out = flash_attn_func(q, k, v, **opts)

    if dv != out.shape[-1]:
        out = out[..., :dv]
    return out, None


def _padded(q, k, v, mask: torch.Tensor, opts) -> torch.Tensor:
    """Unpad (b, s, h, d) by the 2D key mask, run varlen, repad the output with zeros."""
    b, sq = q.shape[:2]
    n = mask.shape[1]
    if k.shape[1] > n:  # a static cache's unwritten slots (the mask covers the tokens seen so far)
        k, v = k[:, :n], v[:, :n]
    elif k.shape[1] < n:
        raise ValueError(f"attention mask of {n} keys for {k.shape[1]} keys")
    # unpad_input's nonzero and max length read the mask on the host: the same reads transformers' FlashAttention
    # path makes (`_get_unpad_data`).
    kp, idx_k, cu_k, max_k, _ = unpad_input(k, mask)
    vp = index_first_axis(v.reshape(-1, *v.shape[2:]), idx_k)
    if sq == n:
        qp, idx_q, cu_q, max_q = index_first_axis(q.reshape(-1, *q.shape[2:]), idx_k), idx_k, cu_k, max_k
    elif sq == 1:
        # Decoding: one query per sequence, taken as valid (as transformers does), with no further host read.
        idx_q = torch.arange(b, device=q.device)
        qp, cu_q, max_q = q.reshape(b, *q.shape[2:]), torch.arange(b + 1, dtype=torch.int32, device=q.device), 1
    else:
        # The queries are the last sq keys (bottom-right), whose mask is the mask's last sq columns.
        qp, idx_q, cu_q, max_q, _ = unpad_input(q, mask[:, -sq:])
    out = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, max_q, max_k, **opts)
    return pad_input(out, idx_q, b, sq)
