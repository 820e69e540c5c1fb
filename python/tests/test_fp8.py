"""FP8 (``torch.float8_e4m3fn``) inputs with FlashAttention-3's ``q_descale``/``k_descale``/``v_descale``: the
conversions against torch's own (every e4m3 code decoded, every bfloat16 value and divided floats encoded), the
forward of every function against the float64 reference of the dequantized inputs under the spec's FP8 rule
(``max|out - ref| <= 2 * max|baseline - ref| + 1e-3``), the KV cache (an FP8 cache with a 16-bit q, appended rows
quantized with the descale), errors, autograd refusal, ``opcheck`` and ``torch.compile``. On CUDA tensors the KV
cache path decodes from FP8 caches with a 16-bit q; FP8 q, k, v raise ``NotImplementedError`` until the FP8
forward kernels are written."""

from __future__ import annotations

import math

import pytest
import torch
from ref import attention, check_lse, err

import flashattn  # noqa: F401  (registers torch.ops.flashattn)
from flashattn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)

F8 = torch.float8_e4m3fn


def fp8(shape, device="cpu", scale=1.0):
    """Fresh normal values (times `scale`) rounded to e4m3 by torch."""
    return (torch.randn(shape) * scale).to(F8).to(device)


def descale(b, hk, device="cpu"):
    """Descales uniform in [0.5, 2], float32 ``(b, hk)``."""
    return (torch.rand(b, hk) * 1.5 + 0.5).to(device)


def dequant(x, ds, heads_dim=-2):
    """``x * descale`` in float64, the descale of ``(batch, kv head)`` broadcast over rows and (for q) the query
    heads of its group. `x` is ``(b, s, heads, d)``."""
    b, heads = x.shape[0], x.shape[heads_dim]
    g = heads // ds.shape[1]
    return x.double() * ds.double().repeat_interleave(g, dim=1).reshape(b, 1, heads, 1)


def fp8_baseline(q, k, v, out_dtype, causal=False, window=(-1, -1)):
    """The FP8 same-precision baseline on dequantized float32 inputs ``(b, s, h, d)``: scores in float32,
    ``p = exp(s - rowmax)`` in float32, the row sum from that ``p``, ``p`` rounded to e4m3 for ``p @ v``, the
    output rounded to `out_dtype`."""
    from ref import visible

    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    kf = k.float().repeat_interleave(h // hk, dim=2)
    vf = v.float().repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kf) / math.sqrt(d)
    ok = visible(sq, sk, causal, window, q.device)
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    p8 = p.to(F8).float()
    o = torch.einsum("bhij,bjhd->bihd", p8, vf) / torch.where(den > 0, den, torch.ones_like(den)).permute(0, 2, 1, 3)
    return o.to(out_dtype)


def check_fp8(name, out, base, ref):
    """The spec's FP8 rule."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    e, bound = err(out, ref), 2 * err(base, ref) + 1e-3
    assert e <= bound, f"{name}: max error {e:.3g} > bound {bound:.3g}"


def nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


# --- conversions --------------------------------------------------------------------------------------------


def test_every_code_decodes_as_torch():
    """One key: ``out = v * v_descale`` exactly (bfloat16 holds every e4m3 value), for all 256 codes."""
    codes = torch.arange(256, dtype=torch.uint8).view(F8).reshape(1, 1, 1, 256)
    q, k = fp8((1, 3, 2, 256)), fp8((1, 1, 1, 256))
    out = flash_attn_func(q, k, codes)
    want = codes.float().expand(1, 3, 2, 256).to(torch.bfloat16)
    assert nan_equal(out.float(), want.float())
    ds = torch.tensor([[0.75]])
    out = flash_attn_func(q, k, codes, v_descale=ds)
    assert nan_equal(out.float(), (codes.float() * 0.75).to(torch.bfloat16).float().expand(1, 3, 2, 256))


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16])
def test_append_quantizes_as_torch(src):
    """New 16-bit rows appended to an FP8 cache are stored as torch's ``(x / descale).to(float8_e4m3fn)``: every
    bfloat16 and float16 bit pattern (NaN included) with descale 1, and random values with a descale; magnitudes
    past 464 (infinities included) saturate to +-448."""
    if src == torch.bfloat16:
        x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    else:
        x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    kn = x.reshape(1, 256, 1, 256)
    vn = (torch.randn(1, 256, 1, 256) * 100).to(src)
    q = torch.randn(1, 1, 1, 256, dtype=src)
    kc = torch.zeros(1, 256, 1, 256, dtype=F8)
    vc = torch.zeros(1, 256, 1, 256, dtype=F8)
    ds_v = torch.tensor([[1.37]])
    flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=0, v_descale=ds_v)
    # Past the largest finite value torch's conversion differs between versions (2.15 saturates to +-448, older
    # ones give NaN there); ours saturates. Within range (and NaN) the bytes must be torch's.
    xs = kn.float()
    big = xs.abs() > 464
    got, want = kc.view(torch.uint8), xs.to(F8).view(torch.uint8)
    assert torch.equal(got[~big], want[~big])
    assert torch.equal(kc[big].float(), torch.where(xs[big] > 0, 448.0, -448.0))
    assert torch.equal(vc.view(torch.uint8), (vn.float() / ds_v[0, 0]).to(F8).view(torch.uint8))


# --- forward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_forward(device, d, mask, heads, out_dtype):
    h, hk = heads
    b, sq, sk = 2, 37, 53
    q, k, v = fp8((b, sq, h, d), device), fp8((b, sk, hk, d), device), fp8((b, sk, hk, d), device)
    qd, kd, vd = descale(b, hk, device), descale(b, hk, device), descale(b, hk, device)
    causal = mask == "causal"
    window = (9, 3) if mask == "window" else (-1, -1)
    kw = dict(causal=causal, window_size=window, q_descale=qd, k_descale=kd, v_descale=vd, out_dtype=out_dtype)
    if device == "cuda":
        with pytest.raises(NotImplementedError, match="FP8"):
            flash_attn_func(q, k, v, **kw)
        return
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.dtype == (out_dtype or torch.bfloat16)
    q64, k64, v64 = dequant(q, qd), dequant(k, kd), dequant(v, vd)
    ref = attention(q64, k64, v64, causal=causal, window=window)
    base = fp8_baseline(q64.float(), k64.float(), v64.float(), out.dtype, causal, window)
    check_fp8("fp8 o", out, base, ref[0])
    check_lse("fp8 lse", lse, ref[1])
    # The descales matter: without them the result is another one.
    plain = flash_attn_func(q, k, v, causal=causal, window_size=window, out_dtype=out_dtype)
    assert err(plain, ref[0]) > 2 * err(base, ref[0]) + 1e-3


def test_packed_and_varlen():
    b, h, hk, d = 3, 4, 2, 64
    qkv = fp8((2, 29, 3, h, d))
    qd = descale(2, h)
    out = flash_attn_qkvpacked_func(qkv, causal=True, q_descale=qd, k_descale=qd, v_descale=qd)
    q, k, v = qkv.unbind(2)
    want = flash_attn_func(q, k, v, causal=True, q_descale=qd, k_descale=qd, v_descale=qd)
    assert torch.equal(out, want)
    q, kv = fp8((2, 29, h, d)), fp8((2, 41, 2, hk, d))
    kd = descale(2, hk)
    out = flash_attn_kvpacked_func(q, kv, k_descale=kd, v_descale=kd, out_dtype=torch.float16)
    assert torch.equal(out, flash_attn_func(q, *kv.unbind(2), k_descale=kd, v_descale=kd, out_dtype=torch.float16))
    # Varlen: the descale of sequence i is row i.
    lq = [5, 0, 31]
    cu_q = torch.tensor([0, 5, 5, 36], dtype=torch.int32)
    cu_k = torch.tensor([0, 17, 26, 66], dtype=torch.int32)
    q, k, v = fp8((36, h, d)), fp8((66, hk, d)), fp8((66, hk, d))
    qd, kd, vd = descale(b, hk), descale(b, hk), descale(b, hk)
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 31, 40, causal=True, q_descale=qd, k_descale=kd, v_descale=vd, return_attn_probs=True
    )
    for i in range(b):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        if lq[i] == 0:
            continue
        q64 = dequant(q[qs][None], qd[i : i + 1])
        k64, v64 = dequant(k[ks][None], kd[i : i + 1]), dequant(v[ks][None], vd[i : i + 1])
        ref = attention(q64, k64, v64, causal=True)
        base = fp8_baseline(q64.float(), k64.float(), v64.float(), torch.bfloat16, True)
        check_fp8(f"varlen seq {i}", out[qs][None], base, ref[0])
        check_lse(f"varlen lse {i}", lse[:, qs], ref[1][0])


@pytest.mark.parametrize("q_dtype", [F8, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache(device, q_dtype, paged):
    """An FP8 cache with an FP8 or 16-bit q; new bf16 rows quantized into it with its descale. On CUDA, a 16-bit
    q (the e4m3 KV kernels); an FP8 q raises ``NotImplementedError`` there."""
    b, h, hk, d, s_cache = 2, 4, 2, 64, 48
    q = fp8((b, 3, h, d)) if q_dtype == F8 else torch.randn(b, 3, h, d, dtype=q_dtype)
    kn, vn = torch.randn(b, 3, hk, d, dtype=torch.bfloat16), torch.randn(b, 3, hk, d, dtype=torch.bfloat16)
    kd, vd = descale(b, hk), descale(b, hk)
    qd = descale(b, hk) if q_dtype == F8 else None
    seqlens = torch.tensor([20, 45], dtype=torch.int32)
    if paged:
        kc, vc = fp8((12, 8, hk, d)), fp8((12, 8, hk, d))
        table = torch.tensor([[3, 0, 5, 7, 1, 2], [11, 4, 6, 8, 9, 10]], dtype=torch.int32)
    else:
        kc, vc = fp8((b, s_cache, hk, d)), fp8((b, s_cache, hk, d))
        table = None
    if device == "cuda":
        # The CUDA kernels take new rows in q's dtype (the CPU backend any 16-bit dtype).
        if q_dtype != F8:
            kn, vn = kn.to(q_dtype), vn.to(q_dtype)
        q, kn, vn, kd, vd, seqlens, kc, vc = (x.cuda() for x in (q, kn, vn, kd, vd, seqlens, kc, vc))
        qd = qd.cuda() if qd is not None else None
        table = table.cuda() if table is not None else None
        if q_dtype == F8:
            with pytest.raises(NotImplementedError, match="FP8"):
                flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, q_descale=qd, k_descale=kd)
            return
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table, causal=True, q_descale=qd, k_descale=kd,
        v_descale=vd, return_softmax_lse=True,
    )  # fmt: skip
    assert out.dtype == (torch.bfloat16 if q_dtype == F8 else q_dtype)

    def logical(c):  # (b, s_cache, hk, d) view of a (paged) cache
        if table is None:
            return c
        return c[table.long()].reshape(b, -1, hk, d)

    for i in range(b):
        n = int(seqlens[i])
        for name, c, c0, new, ds in (("k", kc, kc0, kn, kd), ("v", vc, vc0, vn, vd)):
            got, before = logical(c)[i], logical(c0)[i]
            want = (new[i].float() / ds[i][None, :, None]).to(F8)
            assert torch.equal(got[n : n + 3].view(torch.uint8), want.view(torch.uint8)), f"{name} append, seq {i}"
            assert torch.equal(got[:n].view(torch.uint8), before[:n].view(torch.uint8)), f"{name} rows before"
            assert torch.equal(got[n + 3 :].view(torch.uint8), before[n + 3 :].view(torch.uint8)), f"{name} after"
    for i in range(b):
        n = int(seqlens[i]) + 3
        k64 = dequant(logical(kc)[i : i + 1, :n], kd[i : i + 1])
        v64 = dequant(logical(vc)[i : i + 1, :n], vd[i : i + 1])
        q64 = dequant(q[i : i + 1], qd[i : i + 1]) if qd is not None else q[i : i + 1].double()
        ref = attention(q64, k64, v64, causal=True)
        base = fp8_baseline(q64.float(), k64.float(), v64.float(), out.dtype, True)
        check_fp8(f"kvcache seq {i}", out[i : i + 1], base, ref[0])
        check_lse(f"kvcache lse {i}", lse[i : i + 1], ref[1])


# --- errors, autograd, torch.compile --------------------------------------------------------------------------


def test_errors():
    q, k = fp8((2, 8, 4, 16)), fp8((2, 8, 2, 16))
    qb = torch.randn(2, 8, 4, 16, dtype=torch.bfloat16)
    kb = torch.randn(2, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q_descale.*shape"):
        flash_attn_func(q, k, k, q_descale=torch.ones(2, 4))
    with pytest.raises(TypeError, match="k_descale.*dtype"):
        flash_attn_func(q, k, k, k_descale=torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="v_descale.*finite"):
        flash_attn_func(q, k, k, v_descale=torch.tensor([[1.0, math.inf], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="q_descale.*not FP8"):
        flash_attn_func(qb, kb, kb, q_descale=torch.ones(2, 2))
    with pytest.raises(ValueError, match="out_dtype"):
        flash_attn_func(qb, kb, kb, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype"):
        flash_attn_func(q, k, k, out_dtype=torch.float32)
    with pytest.raises(TypeError, match="`k`.*dtype"):
        flash_attn_func(qb, k, k)
    with pytest.raises(TypeError, match="`k`.*dtype"):
        flash_attn_func(q, kb, kb)
    kc = fp8((2, 16, 2, 16))
    with pytest.raises(ValueError, match="q_descale.*not FP8"):
        flash_attn_with_kvcache(qb, kc, kc.clone(), cache_seqlens=4, q_descale=torch.ones(2, 2))


def test_requires_grad_raises():
    q, k, v = fp8((1, 8, 2, 16)), fp8((1, 8, 2, 16)), fp8((1, 8, 2, 16))
    with pytest.raises(RuntimeError, match="forward-only"):
        flash_attn_func(q.requires_grad_(), k, v)
    with torch.no_grad():
        assert flash_attn_func(q, k, v).dtype == torch.bfloat16


def test_backward_op_refuses_fp8():
    """The backward op itself, reached with FP8 tensors, raises a TypeError naming the dtype."""
    q, k, v = fp8((1, 8, 2, 16)), fp8((1, 8, 2, 16)), fp8((1, 8, 2, 16))
    out, lse = torch.ops.flashattn.fwd(q, k, v, None, None, None, None, 0, 0, None, False, -1, -1, 0.0, False)
    with pytest.raises(TypeError, match="forward-only"):
        torch.ops.flashattn.bwd(torch.randn_like(out), q, k, v, out, lse, None, None, None, None, 0, 0, None, False,
                                -1, -1, 0.0, False)  # fmt: skip


def test_opcheck_and_compile():
    b, h, hk, d = 2, 4, 2, 32
    q, k, v = fp8((b, 17, h, d)), fp8((b, 23, hk, d)), fp8((b, 23, hk, d))
    ds = descale(b, hk)
    args = (q, k, v, None, None, None, None, 0, 0, None, True, -1, -1, 0.0, False, None, ds, ds, ds, torch.float16)
    # opcheck's schema test compares inputs with arithmetic torch does not have for float8 on the CPU
    # ("mul_cpu_reduced_float" not implemented): the other tests run (fakes, autograd registration, AOT dispatch).
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args, test_utils=utils)
    kc, vc = fp8((b, 40, hk, d)), fp8((b, 40, hk, d))
    qb = torch.randn(b, 1, h, d, dtype=torch.bfloat16)
    kn = torch.randn(b, 1, hk, d, dtype=torch.bfloat16)
    seqlens = torch.tensor([3, 30], dtype=torch.int32)
    kv_args = (qb, kc, vc, kn, kn.clone(), seqlens, None, None, None, None, None, True, None, None, True, -1, -1, 0.0,
               None, 0, None, ds, ds, None)  # fmt: skip
    torch.library.opcheck(torch.ops.flashattn.kvcache.default, kv_args, test_utils=utils)

    def step(q, k, v, qb, kc, vc, kn):
        o1 = flash_attn_func(q, k, v, causal=True, q_descale=ds, k_descale=ds, v_descale=ds)
        o2 = flash_attn_with_kvcache(qb, kc, vc, kn, kn, cache_seqlens=seqlens, k_descale=ds, v_descale=ds)
        return o1.float().sum() + o2.float().sum()

    kc_e, vc_e = kc.clone(), vc.clone()
    eager = step(q, k, v, qb, kc_e, vc_e, kn)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, qb, kc, vc, kn)
    torch.testing.assert_close(got, eager)
    assert torch.equal(kc.view(torch.uint8), kc_e.view(torch.uint8))
