"""Multi-head latent attention's decode form on the KV-cache path: ``v_cache=k_cache[..., :512]`` (a view of the
keys' first columns, same storage) with ``headdim`` 576. On CPU tensors the values are read from the key cache
without a copy and appending ``k`` appends them: checked against a plain-torch float64 reference under the spec's
rule, paged and unpaged, MQA and GQA. Any other overlap of the two caches, a ``v`` beside such a view, rotary and
``v_descale`` raise ``ValueError``; CUDA tensors raise ``NotImplementedError``."""

from __future__ import annotations

import math

import pytest
import torch
from ref import attention, attention_one, check, check_lse

from flashattn import flash_attn_with_kvcache

D, DV = 576, 512


def make_mla(device, dtype, *, b=3, h=16, hk=1, sq=1, s_new=1, cap=70, page=None):
    """A key cache (paged or not) with random contents, its values as the view of its first DV columns, q and
    the new keys, per-sequence lengths with one sequence filled exactly to capacity."""
    q = torch.randn(b, sq, h, D, dtype=dtype)
    k_new = torch.randn(b, s_new, hk, D, dtype=dtype) if s_new else None
    seqlens = torch.randint(0, cap - s_new + 1, (b,), dtype=torch.int32)
    seqlens[0] = cap - s_new
    table = None
    if page is None:
        k_cache = torch.randn(b, cap, hk, D, dtype=dtype)
    else:
        per_seq = -(-cap // page)
        n_pages = b * per_seq + 2
        table = torch.randperm(n_pages)[: b * per_seq].reshape(b, per_seq).to(torch.int32)
        k_cache = torch.randn(n_pages, page, hk, D, dtype=dtype)
    k_cache = k_cache.to(device)
    return dict(
        q=q.to(device),
        k_cache=k_cache,
        v_cache=k_cache[..., :DV],
        k=None if k_new is None else k_new.to(device),
        cache_seqlens=seqlens.to(device),
        block_table=None if table is None else table.to(device),
    )


def logical_keys(c, i):
    """Sequence i's cache as logical rows `[capacity, hk, D]` (a copy)."""
    kc, table = c["k_cache"].cpu(), c["block_table"]
    if table is None:
        return kc[i].clone()
    return kc[table[i].cpu().long()].flatten(0, 1).clone()


def reference(c, causal, baseline):
    """(o, lse, appended key rows per sequence): the new keys written at cache_seqlens, then attention over the
    keys with the values their first DV columns, in float64 (or the same-precision baseline)."""
    q = c["q"].cpu()
    outs, lses, appended = [], [], []
    for i in range(q.shape[0]):
        n = int(c["cache_seqlens"][i])
        keys = logical_keys(c, i)
        if c["k"] is not None:
            kn = c["k"][i].cpu()
            keys[n : n + kn.shape[0]] = kn
            appended.append(kn)
            n += kn.shape[0]
        kk, qi = keys[:n], q[i]
        if not baseline:
            kk, qi = kk.double(), qi.double()
        o, lse = attention_one(qi, kk, kk[..., :DV], 1 / math.sqrt(D), causal, (-1, -1), 0.0, None, baseline)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), appended


CASES = [
    # (dtype, page, (h, hk), sq, s_new, causal)
    (torch.bfloat16, None, (16, 1), 1, 1, True),
    (torch.float16, 64, (16, 1), 1, 1, True),
    (torch.bfloat16, 16, (8, 2), 2, 3, True),
    (torch.float16, 1, (16, 1), 1, 0, False),
    (torch.float32, None, (8, 2), 3, 2, True),
    (torch.bfloat16, 7, (6, 6), 2, 2, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_mla_view_of_key_cache(device, case):
    dtype, page, (h, hk), sq, s_new, causal = CASES[case]
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take no float32")
    c = make_mla(device, dtype, h=h, hk=hk, sq=sq, s_new=s_new, page=page)
    if device == "cuda":
        with pytest.raises(NotImplementedError, match="key cache"):
            flash_attn_with_kvcache(**c, causal=causal)
        return
    before = c["k_cache"].clone()
    ref_o, ref_lse, appended = reference(c, causal, baseline=False)
    # The spec's same-precision baseline runs in the input dtype, its output included (as the Rust suite's
    # `naive_forward`): with 512 value columns the output's own rounding is a visible part of the error.
    base_o = reference(c, causal, baseline=True)[0].to(dtype)
    storage = c["k_cache"].untyped_storage().data_ptr()
    out, lse = flash_attn_with_kvcache(**c, causal=causal, return_softmax_lse=True)
    name = f"mla {dtype} page={page} heads={h}/{hk} sq={sq} new={s_new} causal={causal}"
    assert out.shape == (3, sq, h, DV) and out.dtype == dtype
    check(name, out, base_o, ref_o)
    check_lse(name, lse, ref_lse)
    # In place, zero-copy: the same storage; the appended rows hold the new keys and, through the view, the new
    # values; every other row is unchanged.
    assert c["k_cache"].untyped_storage().data_ptr() == storage
    assert c["v_cache"].data_ptr() == c["k_cache"].data_ptr()
    for i in range(3):
        n = int(c["cache_seqlens"][i])
        now, was = logical_keys(c, i), logical_keys(dict(c, k_cache=before), i)
        if s_new:
            assert torch.equal(now[n : n + s_new], appended[i]), f"{name}: keys not appended"
            now[n : n + s_new] = was[n : n + s_new]
        assert torch.equal(now, was), f"{name}: cache rows outside the append changed"
    # The same call over a value cache of its own (a copy of the view) gives the same output, bit for bit.
    c2 = dict(c, k_cache=before.clone())
    c2["v_cache"] = c2["k_cache"][..., :DV].clone()
    if c["k"] is not None:
        c2["v"] = c["k"][..., :DV]
    assert torch.equal(flash_attn_with_kvcache(**c2, causal=causal), out)


def test_mla_fp8_cache_uses_k_descale():
    """An e4m3 key cache with a bfloat16 q: the view's values are dequantized with k_descale (the spec's FP8 rule
    against the float64 reference of the dequantized cache); a v_descale is refused."""
    from test_fp8 import F8, check_fp8, dequant, fp8_baseline

    q = torch.randn(2, 1, 16, D, dtype=torch.bfloat16)
    kc = torch.randn(2, 40, 1, D).to(F8)
    desc = torch.tensor([[0.5], [1.75]])
    out = flash_attn_with_kvcache(q, kc, kc[..., :DV], k_descale=desc)
    keys = dequant(kc, desc)
    ref_o, _ = attention(q.double(), keys, keys[..., :DV])
    base = fp8_baseline(q.float(), keys.float(), keys[..., :DV].float(), torch.bfloat16)
    check_fp8("mla e4m3 cache", out, base, ref_o)
    with pytest.raises(ValueError, match="v_descale"):
        flash_attn_with_kvcache(q, kc, kc[..., :DV], k_descale=desc, v_descale=desc)


def test_mla_errors(device):
    c = make_mla(device, torch.bfloat16)
    kc, kn = c["k_cache"], c["k"]
    before = kc.clone()
    # Overlaps that are not k_cache[..., :d_v]: columns shifted by one, the cache one row down, another dtype's view.
    for kw in (
        dict(v_cache=kc[..., 1 : DV + 1]),
        dict(k_cache=kc[:, :-1], v_cache=kc[:, 1:, :, :DV]),
        dict(v_cache=kc.view(torch.float16)[..., :DV]),
    ):
        with pytest.raises(ValueError, match="overlaps k_cache"):
            flash_attn_with_kvcache(**dict(c, k=None, **kw))
    # A `v` beside the view: the values come with `k`.
    with pytest.raises(ValueError, match="`v`"):
        flash_attn_with_kvcache(**c, v=kn[..., :DV])
    # `k` without `v` and a value cache of its own: both or neither, as FlashAttention.
    with pytest.raises(ValueError, match="`v`"):
        flash_attn_with_kvcache(**dict(c, v_cache=kc[..., :DV].clone()))
    if device == "cuda":
        with pytest.raises(NotImplementedError, match="key cache"):
            flash_attn_with_kvcache(**c)
    else:
        cos = sin = torch.zeros(80, 32)
        with pytest.raises(ValueError, match="rotary"):
            flash_attn_with_kvcache(**c, rotary_cos=cos, rotary_sin=sin)
        # A head dim above the KV-cache path's 576.
        wide = torch.zeros(3, 8, 1, 577, dtype=torch.bfloat16)
        q = torch.zeros(3, 1, 2, 577, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="576"):
            flash_attn_with_kvcache(q, wide, wide[..., :DV], cache_seqlens=1)
    assert torch.equal(kc, before), "a refused call wrote the cache"


def test_mla_compile_fullgraph():
    """`torch.compile(fullgraph=True)` of a decode step over the view: the op sees two aliased cache arguments
    (functionalised by torch), and the compiled step's output and append equal eager's. CPU tensors (aot_eager,
    as test_torch.py: no C++ compiler needed)."""
    kc = torch.randn(2, 64, 1, D, dtype=torch.bfloat16)
    q = torch.randn(2, 1, 16, D, dtype=torch.bfloat16)
    kn = torch.randn(2, 1, 1, D, dtype=torch.bfloat16)
    seqlens = torch.tensor([10, 63], dtype=torch.int32)

    def step(q, kc, kn, seqlens):
        return flash_attn_with_kvcache(q, kc, kc[..., :DV], k=kn, cache_seqlens=seqlens, causal=True)

    kc_eager = kc.clone()
    eager = step(q, kc_eager, kn, seqlens)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, kn, seqlens)
    assert torch.equal(out, eager)
    assert torch.equal(kc, kc_eager), "the compiled step's append differs from eager's"
