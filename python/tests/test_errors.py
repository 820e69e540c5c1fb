"""Bad input gets the exception torch would raise, naming the argument, and nothing is written."""

from __future__ import annotations

import pytest
import torch

from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache


def qkv(device, dtype=torch.float16, b=2, s=16, h=4, hk=4, d=32):
    return (
        torch.randn(b, s, h, d, device=device, dtype=dtype),
        torch.randn(b, s, hk, d, device=device, dtype=dtype),
        torch.randn(b, s, hk, d, device=device, dtype=dtype),
    )


def test_wrong_dtype(device):
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match="`q`.*float64"):
        flash_attn_func(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="`q`"):
        flash_attn_func(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(TypeError, match="`k`.*dtype"):
        flash_attn_func(q, k.to(torch.bfloat16), v)
    if device == "cuda":
        with pytest.raises(NotImplementedError, match="f32"):
            flash_attn_func(q.float(), k.float(), v.float())


def test_wrong_shapes(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="`q`.*rank 4"):
        flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="`v`"):
        flash_attn_func(q, k, v[:, :8])
    q6, k4, v4 = qkv(device, h=6, hk=4)
    with pytest.raises(ValueError, match="`k`.*heads"):
        flash_attn_func(q6, k4, v4)
    q3, k3, v3 = qkv(device, d=264)
    with pytest.raises(ValueError, match="head dim"):
        flash_attn_func(q3, k3, v3)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=5)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attn_func(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device=device))


def test_dropout_not_implemented(device):
    q, k, v = qkv(device)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)


def test_varlen_metadata(device):
    q = torch.randn(20, 2, 32, device=device, dtype=torch.float16)
    cu = torch.tensor([0, 5, 20], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="`cu_seqlens_q`.*int32"):
        flash_attn_varlen_func(q, q, q, cu.long(), cu, 15, 15)
    with pytest.raises(TypeError, match="`cu_seqlens_k`"):
        flash_attn_varlen_func(q, q, q, cu, [0, 5, 20], 15, 15)
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(q, q, q, cu, cu, 15, 15, block_table=cu[None])
    if device == "cpu":
        # Host metadata is validated in full: a decreasing cu_seqlens is refused.
        with pytest.raises(ValueError, match="`cu_seqlens_q`.*non-decreasing"):
            flash_attn_varlen_func(q, q, q, torch.tensor([0, 15, 5, 20], dtype=torch.int32), cu, 15, 15)
        with pytest.raises(ValueError, match="`cu_seqlens_k`"):
            flash_attn_varlen_func(q, q, q, cu, torch.tensor([0, 5, 19], dtype=torch.int32), 15, 15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    q, k, v = qkv("cuda")
    with pytest.raises(RuntimeError, match="`k`.*cuda.*cpu"):
        flash_attn_func(q, k.cpu(), v)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    qv = q.reshape(32, 4, 32)
    with pytest.raises(RuntimeError, match="`cu_seqlens_q`"):
        flash_attn_varlen_func(qv, qv, qv, cu, cu.cuda(), 16, 16)
    kc = torch.zeros(2, 32, 4, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="`cache_seqlens`"):
        flash_attn_with_kvcache(q[:, :1], kc, kc.clone(), cache_seqlens=torch.tensor([1, 2], dtype=torch.int32))


def test_kvcache_overflow_writes_nothing(device):
    dtype = torch.bfloat16
    q = torch.randn(2, 1, 4, 32, device=device, dtype=dtype)
    k_cache = torch.randn(2, 10, 2, 32, device=device, dtype=dtype)
    v_cache = torch.randn(2, 10, 2, 32, device=device, dtype=dtype)
    k_new = torch.randn(2, 3, 2, 32, device=device, dtype=dtype)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([2, 8], dtype=torch.int32, device=device)  # 8 + 3 > 10
    if device == "cpu":
        with pytest.raises(ValueError, match="overflow for sequence 1"):
            flash_attn_with_kvcache(q, k_cache, v_cache, k_new, k_new, cache_seqlens=seqlens)
    else:
        # The lengths live on the device and are not read back: the kernels refuse the call, write nothing to
        # the cache and fill the output with NaN.
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, k_new, cache_seqlens=seqlens)
        torch.cuda.synchronize()
        assert torch.isnan(out).all()
    assert torch.equal(k_cache, kc0) and torch.equal(v_cache, vc0)
    # The next valid call works normally.
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, k_new, cache_seqlens=seqlens - 1)
    assert torch.isfinite(out).all()


def test_kvcache_arguments(device):
    q = torch.randn(2, 1, 4, 32, device=device, dtype=torch.float16)
    kc = torch.randn(2, 10, 2, 32, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="`v`"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k=kc[:, :1])
    with pytest.raises(ValueError, match="`k_cache`"):
        flash_attn_with_kvcache(q, kc[0], kc.clone())
    with pytest.raises(TypeError, match="`cache_seqlens`"):
        flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="page_table"):
        t = torch.zeros(2, 1, dtype=torch.int32, device=device)
        flash_attn_with_kvcache(q, kc, kc.clone(), block_table=t, page_table=t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bad_device_metadata_stays_in_bounds():
    """Metadata in device memory is not read back (no synchronisation). What its errors do, by design:
    a decreasing `cu_seqlens` pair makes that sequence empty (its rows are not written by it); a block-table
    entry out of range makes the KV kernels skip that row. Neither reads or writes out of bounds (the CUDA run
    of this test goes under compute-sanitizer memcheck), and the device stays usable."""
    dev, dtype = "cuda", torch.float16
    q = torch.randn(40, 2, 64, device=dev, dtype=dtype)
    cu_bad = torch.tensor([0, 30, 10, 40], dtype=torch.int32, device=dev)
    out = flash_attn_varlen_func(q, q, q, cu_bad, cu_bad, 30, 30)
    torch.cuda.synchronize()
    assert out.shape == q.shape
    # A valid call right after gives the right answer.
    cu = torch.tensor([0, 10, 40], dtype=torch.int32, device=dev)
    good = flash_attn_varlen_func(q, q, q, cu, cu, 30, 30)
    again = flash_attn_varlen_func(q.cpu(), q.cpu(), q.cpu(), cu.cpu(), cu.cpu(), 30, 30)
    torch.testing.assert_close(good.cpu(), again, rtol=1e-2, atol=1e-2)
    kc = torch.randn(4, 16, 2, 64, device=dev, dtype=dtype)
    table = torch.tensor([[0, 1], [2, 99]], dtype=torch.int32, device=dev)  # 99: no such page
    seqlens = torch.tensor([20, 20], dtype=torch.int32, device=dev)
    qd = torch.randn(2, 1, 2, 64, device=dev, dtype=dtype)
    out = flash_attn_with_kvcache(qd, kc, kc.clone(), cache_seqlens=seqlens, block_table=table)
    torch.cuda.synchronize()
    assert out.shape == qd.shape


def test_extension_refuses_other_devices():
    # The extension reads tensors itself: one on another device (meta here; XPU or MPS alike) is refused by name,
    # never taken for host memory or for a CUDA device of the same index.
    from flashattn import _flashattn

    q = torch.randn(1, 4, 2, 16)
    m = torch.empty(1, 4, 2, 16, device="meta")
    out, lse = torch.empty_like(q), torch.empty(1, 2, 4)
    # alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q/k, softmax_scale, causal, window, softcap
    shared = (None, None, None, None, 0, 0, None, False, -1, -1, 0.0)
    with pytest.raises(RuntimeError, match="`k`.*CPU or CUDA.*meta"):
        _flashattn.fwd((q, m, q, out, lse), shared)
    with pytest.raises(TypeError, match="`v`.*torch.Tensor"):
        _flashattn.fwd((q, q, [1.0], out, lse), shared)
