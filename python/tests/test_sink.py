"""Learnable sinks (`learnable_sink=`): forward, lse and every gradient (`dsink` included) against the float64
reference on every device (the CUDA forward, varlen and KV-cache kernels fold the sink in; the CUDA backward
computes `dsink` from its own float32 P and dP)."""

from __future__ import annotations

import pytest
import torch
from ref import attention, check, check_lse, err
from test_attention import grads_of

from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache


def sink_case(device, dtype, lift=0.0, h=4, hk=2):
    q = torch.randn(2, 37, h, 32, device=device, dtype=dtype)
    k = torch.randn(2, 45, hk, 32, device=device, dtype=dtype)
    v = torch.randn(2, 45, hk, 32, device=device, dtype=dtype)
    sink = (torch.randn(h, device=device) * 2 + lift).float()
    return q, k, v, sink


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lift", [0.0, 8.0])
def test_sink_forward_and_gradients(device, causal, lift):
    dtype = torch.bfloat16
    q, k, v, sink = sink_case(device, dtype, lift)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, learnable_sink=sink, return_attn_probs=True)
    ref = attention(q.double(), k.double(), v.double(), causal=causal, sink=sink.double())
    base = attention(q, k, v, causal=causal, sink=sink, baseline=True)
    check("sink o", out, base[0], ref[0])
    check_lse("sink lse", lse, ref[1])

    dout = torch.randn_like(out)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sink)]
    got = grads_of(lambda q, k, v, s: flash_attn_func(q, k, v, causal=causal, learnable_sink=s), leaves, dout)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v, sink)]
    want = grads_of(lambda q, k, v, s: attention(q, k, v, causal=causal, sink=s)[0], leaves64, dout.double())
    leaves_b = [t.clone().requires_grad_() for t in (q, k, v, sink)]
    base_g = grads_of(
        lambda q, k, v, s: attention(q, k, v, causal=causal, sink=s, baseline=True)[0].to(dtype), leaves_b, dout
    )
    for name, a, b, r in zip(("dq", "dk", "dv"), got, base_g, want):
        check(f"sink {name}", a, b.to(a.dtype), r, 3.0)
    # dsink follows the dq rule (the spec) even for a float32 sink: its error comes from the 16-bit o and dO.
    ds, ds_base, ds_ref = got[3], base_g[3], want[3]
    assert ds.dtype == sink.dtype and ds.shape == sink.shape
    bound = 3.0 * err(ds_base, ds_ref) + 1e-5
    assert err(ds, ds_ref) <= bound, f"dsink: max error {err(ds, ds_ref):.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("sink_dtype", [torch.float32, torch.bfloat16])
def test_sink_rows_without_keys(device, sink_dtype):
    """Rows that see no key (causal, sq > sk): o = 0 and lse = the sink, exactly; a 16-bit sink (a model's
    parameter) is taken as its float32 value."""
    q = torch.randn(1, 9, 2, 16, device=device, dtype=torch.float16)
    k = torch.randn(1, 4, 2, 16, device=device, dtype=torch.float16)
    sink = torch.tensor([0.5, -2.0], device=device, dtype=sink_dtype)
    out, lse, _ = flash_attn_func(q, k, k, causal=True, learnable_sink=sink, return_attn_probs=True)
    assert torch.equal(out[0, :5], torch.zeros(5, 2, 16, device=device, dtype=torch.float16))
    assert torch.equal(lse[0, :, :5], sink.float()[:, None].expand(2, 5))


def test_sink_varlen_and_kvcache(device):
    q, k, v, sink = sink_case(device, torch.float16)
    dense = flash_attn_func(q, k, v, causal=True, learnable_sink=sink)
    cu_q = torch.tensor([0, 37, 74], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 45, 90], dtype=torch.int32, device=device)
    vl = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 37, 45, causal=True, learnable_sink=sink
    )
    kv = flash_attn_with_kvcache(q, k.clone(), v.clone(), causal=True, learnable_sink=sink)
    if device == "cpu":
        # One kernel behind all three on the CPU: bit-identical.
        assert torch.equal(vl, dense.flatten(0, 1))
        assert torch.equal(kv, dense)
        return
    ref = attention(q.double(), k.double(), v.double(), causal=True, sink=sink.double())[0]
    base = attention(q, k, v, causal=True, sink=sink, baseline=True)[0]
    check("sink dense", dense, base, ref)
    check("sink varlen", vl.unflatten(0, (2, 37)), base, ref)
    check("sink kvcache", kv, base, ref)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sink_decode_splits(device, num_splits):
    """One query token against a paged cache, the keys split or not: the sink joins each row once (on CUDA in the
    split merge, never per split)."""
    h, hk, d, page = 16, 4, 64, 16
    q = torch.randn(3, 1, h, d, device=device, dtype=torch.float16)
    k = torch.randn(3, 200, hk, d, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    sink = torch.randn(h, device=device) * 2 + 1.0
    lens = torch.tensor([200, 77, 1], dtype=torch.int32, device=device)
    pages = 200 // page + 1
    kc = torch.zeros(3 * pages, page, hk, d, device=device, dtype=k.dtype)
    vc = torch.zeros_like(kc)
    table = torch.randperm(3 * pages, device=device).to(torch.int32).view(3, pages)
    for b in range(3):
        for t in range(200):
            kc[table[b, t // page], t % page] = k[b, t]
            vc[table[b, t // page], t % page] = v[b, t]
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=lens, block_table=table, learnable_sink=sink, num_splits=num_splits,
        return_softmax_lse=True,
    )  # fmt: skip
    # The rule over the whole batch at once (one row per sequence is too few values for a max-error bound).
    refs, bases = [], []
    for b in range(3):
        n = int(lens[b])
        qb, kb, vb = q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n]
        refs.append(attention(qb.double(), kb.double(), vb.double(), sink=sink.double()))
        bases.append(attention(qb, kb, vb, sink=sink, baseline=True)[0])
    check("sink decode o", out, torch.cat(bases), torch.cat([r[0] for r in refs]))
    check_lse("sink decode lse", lse, torch.cat([r[1] for r in refs]))


def test_sink_refusals(device):
    q, k, v, sink = sink_case(device, torch.bfloat16)
    with pytest.raises(ValueError, match="sink"):
        flash_attn_func(q, k, v, learnable_sink=sink[:3])
    if device == "cuda":
        return  # values in device memory are not read on the host (a NaN sink propagates)
    with pytest.raises(ValueError, match="sink"):
        flash_attn_func(q, k, v, learnable_sink=torch.full((4,), float("nan")))


def test_opcheck_with_a_sink(device):
    q, k, v, sink = sink_case(device, torch.bfloat16)
    args = (q, k, v, None, None, None, None, 0, 0, None, True, -1, -1, 0.0, False, sink.requires_grad_())
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args)
