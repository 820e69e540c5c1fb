"""A value head dim `d_v` other than the query/key head dim `d` (v `(.., hk, d_v)`, out `(.., h, d_v)`, the default
scale from `d`): the entry points against the float64 reference under the spec's rule, forward and backward, on
CPU tensors (any d_v) and CUDA tensors (the sm80-class kernels: (d, d_v) padding to (192, 128), (128, 64) or
(64, 128)). On CUDA other pairs, and any d_v != d in a KV cache, raise NotImplementedError."""

from __future__ import annotations

import pytest
import torch
from ref import attention, check
from test_attention import check_all, feature_args, random_cu, ref_kw

import flashattn  # noqa: F401  (registers torch.ops.flashattn)
from flashattn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_varlen_func, flash_attn_with_kvcache

# The spec's (d, d_v) pairs: DeepSeek-style 192/128, a narrower and a wider value.
DIMS = [(192, 128), (128, 64), (64, 128)]


def _refused(fn) -> None:
    with pytest.raises(NotImplementedError, match="value head dim"):
        fn()


@pytest.mark.parametrize("feat", ["none", "causal", "window", "softcap"])
@pytest.mark.parametrize("dims", DIMS)
def test_func(device, dims, feat):
    d, dv = dims
    b, sq, sk, h, hk = 2, 37, 53, 4, 2
    dtype = torch.bfloat16 if feat != "none" else torch.float16
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, dv, device=device, dtype=dtype)
    if feat == "softcap":
        q = q * 8
    kw = feature_args(feat, b, h, device)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.shape == (b, sq, h, dv) and lse.shape == (b, h, sq)
    check_all(
        f"func d{d} dv{dv} {feat}",
        dtype,
        lambda q, k, v: flash_attn_func(q, k, v, **kw),
        lambda q, k, v, baseline: attention(q, k, v, baseline=baseline, **ref_kw(kw)),
        [q, k, v],
        kw,
        lse_ours=lse,
    )


@pytest.mark.parametrize("dims", DIMS)
def test_float32_and_mqa(device, dims):
    """float32 (CPU only) within 1e-4 of the reference, one key/value head for all query heads."""
    if device == "cuda":
        pytest.skip("the CUDA kernels take no float32")
    d, dv = dims
    q = torch.randn(2, 20, 3, d)
    k = torch.randn(2, 31, 1, d)
    v = torch.randn(2, 31, 1, dv)
    kw = feature_args("causal", 2, 3, device)
    check_all(
        f"f32 MQA d{d} dv{dv}",
        torch.float32,
        lambda q, k, v: flash_attn_func(q, k, v, causal=True),
        lambda q, k, v, baseline: attention(q, k, v, causal=True, baseline=baseline),
        [q, k, v],
        kw,
    )


@pytest.mark.parametrize("dims", DIMS)
def test_varlen(device, dims):
    d, dv = dims
    dtype = torch.float16
    h, hk = 4, 2
    lq, lk = [17, 0, 40], [25, 9, 0]  # an empty sequence and one with no keys
    cu_q, cu_k = random_cu(lq, device), random_cu(lk, device)
    q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
    k = torch.randn(sum(lk), hk, d, device=device, dtype=dtype)
    v = torch.randn(sum(lk), hk, dv, device=device, dtype=dtype)
    kw = feature_args("causal", 3, h, device)
    mq, mk = max(lq), max(lk)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_attn_probs=True)
    assert out.shape == (sum(lq), h, dv)
    check_all(
        f"varlen d{d} dv{dv}",
        dtype,
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=True),
        lambda q, k, v, baseline: attention(q, k, v, cu_q=cu_q.cpu(), cu_k=cu_k.cpu(), causal=True, baseline=baseline),
        [q, k, v],
        kw,
        lse_ours=lse,
    )


def test_sink_and_strided_output(device):
    """A learnable sink with a different value head dim (100: padded to 128 on CUDA), and q a strided view: out is
    allocated contiguous with v's head dim (empty_like of q only when the head dims agree)."""
    d, dv = 64, 100
    qkv = torch.randn(2, 30, 3, 4, d, dtype=torch.bfloat16, device=device)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    v = torch.randn(2, 30, 4, dv, dtype=torch.bfloat16, device=device)
    sink = torch.randn(4, device=device) * 2
    out = flash_attn_func(q, k, v, causal=True, learnable_sink=sink)
    assert out.shape == (2, 30, 4, dv) and out.is_contiguous()
    q, k, v, sink = q.cpu(), k.cpu(), v.cpu(), sink.cpu()
    ref = attention(q.double(), k.double(), v.double(), causal=True, sink=sink.double())[0]
    base = attention(q, k, v, causal=True, sink=sink, baseline=True)[0]
    check("sink dv", out.cpu(), base, ref)


def test_cuda_refusals():
    """On CUDA tensors a (d, d_v) pair the kernels are not compiled for, and any d_v != d in a KV cache, raise
    NotImplementedError naming the value head dim; the KV cache is left as it was."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q = torch.randn(1, 8, 4, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2, 192, device="cuda", dtype=torch.bfloat16)
    _refused(lambda: flash_attn_func(q, k, torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)))
    kc = torch.randn(1, 16, 2, 192, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(1, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    before = (kc.clone(), vc.clone())
    seqlens = torch.full((1,), 4, dtype=torch.int32, device="cuda")
    _refused(lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_kvpacked_needs_equal_dims_but_separate_kv_does_not(device):
    """kv packed in one tensor shares its head dim by construction; q of another head dim than k is refused with
    the argument named (ValueError), whatever the value head dim."""
    q = torch.randn(1, 5, 2, 32, device=device, dtype=torch.float16)
    kv = torch.randn(1, 7, 2, 2, 32, device=device, dtype=torch.float16)
    assert flash_attn_kvpacked_func(q, kv).shape == (1, 5, 2, 32)
    k = torch.randn(1, 7, 2, 16, device=device, dtype=torch.float16)
    v = torch.randn(1, 7, 2, 24, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="`k`"):
        flash_attn_func(q, k, v)
    k = torch.randn(1, 7, 2, 32, device=device, dtype=torch.float16)
    v_bad = torch.randn(1, 6, 2, 24, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="`v`"):
        flash_attn_func(q, k, v_bad)


def test_fake_and_compile_shapes():
    """The ops' fake implementations give out v's head dim (meta tensors, and torch.compile traces them)."""
    q = torch.empty(2, 9, 4, 96, device="meta", dtype=torch.float16)
    k = torch.empty(2, 11, 2, 96, device="meta", dtype=torch.float16)
    v = torch.empty(2, 11, 2, 48, device="meta", dtype=torch.float16)
    out = flash_attn_func(q, k, v, causal=True)
    assert out.shape == (2, 9, 4, 48) and out.device.type == "meta"
    kc = torch.empty(2, 20, 2, 96, device="meta", dtype=torch.float16)
    vc = torch.empty(2, 20, 2, 48, device="meta", dtype=torch.float16)
    o = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device="meta"))
    assert o.shape == (2, 9, 4, 48)


def test_opcheck():
    """`torch.library.opcheck` of the forward and backward ops with d_v != d (CPU)."""
    dtype = torch.bfloat16
    q = torch.randn(2, 13, 4, 64, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 17, 2, 64, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 17, 2, 32, dtype=dtype, requires_grad=True)
    args = (q, k, v, None, None, None, None, 0, 0, None, True, -1, -1, 0.0, False)
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args)
    out, lse = torch.ops.flashattn.fwd(*args)
    assert out.shape == (2, 13, 4, 32)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    torch.library.opcheck(torch.ops.flashattn.bwd.default, bwd_args)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a call with d_v != d: same result as eager."""
    q = torch.randn(1, 8, 2, 32, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2, 32, dtype=torch.bfloat16)
    v = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    f = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), flash_attn_func(q, k, v, causal=True) * 2, rtol=0, atol=0)
