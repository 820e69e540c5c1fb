"""Every FlashAttention-2 function against the float64 reference under the spec's accuracy rule, forward and
backward, on every test device."""

from __future__ import annotations

import pytest
import torch
from ref import attention, check, check_lse

import flashattn
from flashattn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

FEATURES = ["none", "causal", "window", "alibi", "softcap"]


def dtypes(device):
    return [torch.float16, torch.bfloat16] + ([torch.float32] if device == "cpu" else [])


def feature_args(feat, b, h, device, q_scale=1.0):
    kw = dict(causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    if feat == "causal":
        kw["causal"] = True
    elif feat == "window":
        kw["window_size"] = (int(torch.randint(0, 40, ())), int(torch.randint(0, 40, ())))
    elif feat == "alibi":
        kw["alibi_slopes"] = (torch.rand(b, h, device=device) * 0.3).float()
    elif feat == "softcap":
        kw["softcap"] = 50.0
    return kw


def ref_kw(kw):
    return dict(causal=kw["causal"], window=kw["window_size"], softcap=kw["softcap"], alibi=kw["alibi_slopes"])


def factor(kw):
    return 3.0 if kw["softcap"] > 0 or kw["alibi_slopes"] is not None else 2.0


def grads_of(fn, inputs, dout):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return [t.grad.clone() for t in inputs]


def check_all(name, dtype, fwd_ours, fwd_ref, inputs, kw, with_backward=True, lse_ours=None):
    """Forward (and backward) of `fwd_ours` against the float64 reference and the same-precision baseline."""
    f = factor(kw)
    with torch.no_grad():
        out = fwd_ours(*inputs)
    ref = fwd_ref(*[t.detach().double() for t in inputs], baseline=False)
    base = fwd_ref(*[t.detach() for t in inputs], baseline=True)
    check(f"{name} o", out.cpu(), base[0].cpu(), ref[0].cpu(), f)
    if lse_ours is not None:
        check_lse(f"{name} lse", lse_ours.cpu(), ref[1].cpu())
    if not with_backward:
        return
    dout = torch.randn_like(out)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    g = grads_of(fwd_ours, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    g_ref = grads_of(lambda *a: fwd_ref(*a, baseline=False)[0], leaves64, dout.double())
    leaves_b = [t.detach().clone().requires_grad_() for t in inputs]
    g_base = grads_of(lambda *a: fwd_ref(*a, baseline=True)[0].to(dtype), leaves_b, dout)
    for gn, a, b, r in zip(("dq", "dk", "dv"), g, g_base, g_ref):
        check(f"{name} {gn}", a.cpu(), b.cpu(), r.cpu(), 3.0)


CASES = [
    # (d, sq, sk, h, hk)
    (64, 113, 203, 6, 6),
    (59, 128, 217, 6, 2),
    (128, 239, 1, 6, 1),
    (32, 1, 147, 6, 2),
    (96, 127, 128, 4, 4),
    (256, 64, 80, 2, 1),
]


@pytest.mark.parametrize("feat", FEATURES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_flash_attn_func(device, feat, case):
    d, sq, sk, h, hk = CASES[case]
    b = 2
    dtype = dtypes(device)[case % len(dtypes(device))]
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    if feat == "softcap":
        q = q * 8
    kw = feature_args(feat, b, h, device)
    _, lse, none = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert none is None and lse.dtype == torch.float32 and lse.shape == (b, h, sq)
    check_all(
        f"func {dtype} d{d} {sq}x{sk} h{h}/{hk} {feat}",
        dtype,
        lambda q, k, v: flash_attn_func(q, k, v, **kw),
        lambda q, k, v, baseline: attention(q, k, v, baseline=baseline, **ref_kw(kw)),
        [q, k, v],
        kw,
        lse_ours=lse,
    )


def test_scale_and_deterministic(device):
    dtype = torch.bfloat16
    q, k, v = (torch.randn(2, 100, 4, 64, device=device, dtype=dtype) for _ in range(3))
    kw = dict(causal=True, window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    check_all(
        "scale 0.3",
        dtype,
        lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.3, causal=True),
        lambda q, k, v, baseline: attention(q, k, v, scale=0.3, causal=True, baseline=baseline),
        [q, k, v],
        kw,
    )
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attn_func(*leaves, causal=True, deterministic=True).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b), "deterministic backward differs between two runs"


def test_strided_views_and_noncontiguous_last_dim(device):
    dtype = torch.float16
    b, s, h, d = 2, 77, 4, 64
    buf = torch.randn(b, s, 3 * h + 1, d, device=device, dtype=dtype)  # views with a padded head stride
    q, k, v = buf[:, :, :h], buf[:, :, h : 2 * h], buf[:, :, 2 * h : 3 * h]
    assert not q.is_contiguous()
    out = flash_attn_func(q, k, v, causal=True)
    ref = attention(q.double(), k.double(), v.double(), causal=True)[0]
    base = attention(q, k, v, causal=True, baseline=True)[0]
    check("strided views", out.cpu(), base.cpu(), ref.cpu())
    # A last dim that is not contiguous is copied once, as FlashAttention-2 does.
    qt = torch.randn(b, s, h, d, device=device, dtype=dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    out2 = flash_attn_func(qt, k, v)
    ref2 = attention(qt.double(), k.double(), v.double())[0]
    base2 = attention(qt, k, v, baseline=True)[0]
    check("last dim copied", out2.cpu(), base2.cpu(), ref2.cpu())


@pytest.mark.parametrize("feat", ["none", "causal", "alibi"])
def test_packed(device, feat):
    dtype = torch.bfloat16
    b, s, h, d = 2, 90, 4, 64
    kw = feature_args(feat, b, h, device)
    qkv = torch.randn(b, s, 3, h, d, device=device, dtype=dtype)
    check_all(
        f"qkvpacked {feat}",
        dtype,
        lambda x: flash_attn_qkvpacked_func(x, **kw),
        lambda x, baseline: attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], baseline=baseline, **ref_kw(kw)),
        [qkv],
        kw,
        with_backward=False,
    )
    qkv_leaf = qkv.clone().requires_grad_()
    flash_attn_qkvpacked_func(qkv_leaf, **kw).sum().backward()
    assert qkv_leaf.grad.shape == qkv.shape and torch.isfinite(qkv_leaf.grad).all()
    q = torch.randn(b, s + 7, h, d, device=device, dtype=dtype)
    kv = torch.randn(b, s, 2, h // 2, d, device=device, dtype=dtype)
    check_all(
        f"kvpacked {feat}",
        dtype,
        lambda q, kv: flash_attn_kvpacked_func(q, kv, **kw),
        lambda q, kv, baseline: attention(q, kv[:, :, 0], kv[:, :, 1], baseline=baseline, **ref_kw(kw)),
        [q, kv],
        kw,
    )


def random_cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


@pytest.mark.parametrize("feat", FEATURES)
def test_varlen(device, feat):
    dtype = torch.float16 if feat != "window" else torch.bfloat16
    h, hk, d = 6, 2, 64
    lq = [int(x) for x in torch.randint(1, 150, (4,))]
    lk = [int(x) for x in torch.randint(1, 150, (4,))]
    lq[1] = 0  # an empty sequence
    lk[2] = 0  # a sequence with no keys: its rows output 0, lse -inf
    cu_q, cu_k = random_cu(lq, device), random_cu(lk, device)
    q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
    k = torch.randn(sum(lk), hk, d, device=device, dtype=dtype)
    v = torch.randn(sum(lk), hk, d, device=device, dtype=dtype)
    if feat == "softcap":
        q = q * 8
    kw = feature_args(feat, 4, h, device)
    mq, mk = max(lq), max(lk)
    _, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, return_attn_probs=True, **kw)
    assert lse.shape == (h, sum(lq))
    check_all(
        f"varlen {feat}",
        dtype,
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, **kw),
        lambda q, k, v, baseline: attention(q, k, v, cu_q=cu_q.cpu(), cu_k=cu_k.cpu(), baseline=baseline, **ref_kw(kw)),
        [q, k, v],
        kw,
        lse_ours=lse,
    )


def test_varlen_seqused_k(device):
    dtype = torch.bfloat16
    h, d = 4, 64
    lq, lk = [30, 1, 64], [50, 40, 64]
    used = torch.tensor([20, 0, 64], dtype=torch.int32, device=device)
    cu_q, cu_k = random_cu(lq, device), random_cu(lk, device)
    q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
    k = torch.randn(sum(lk), h, d, device=device, dtype=dtype)
    v = torch.randn(sum(lk), h, d, device=device, dtype=dtype)
    kw = dict(causal=True, window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    check_all(
        "varlen seqused_k",
        dtype,
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 64, 64, causal=True, seqused_k=used),
        lambda q, k, v, baseline: attention(
            q, k, v, cu_q=cu_q.cpu(), cu_k=cu_k.cpu(), seqused_k=used.cpu(), causal=True, baseline=baseline
        ),
        [q, k, v],
        kw,
    )


def test_varlen_packed(device):
    dtype = torch.float16
    h, d = 4, 32
    lens = [17, 64, 3]
    cu = random_cu(lens, device)
    qkv = torch.randn(sum(lens), 3, h, d, device=device, dtype=dtype)
    kw = dict(causal=True, window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    check_all(
        "varlen qkvpacked",
        dtype,
        lambda x: flash_attn_varlen_qkvpacked_func(x, cu, 64, causal=True),
        lambda x, baseline: attention(
            x[:, 0], x[:, 1], x[:, 2], cu_q=cu.cpu(), cu_k=cu.cpu(), causal=True, baseline=baseline
        ),
        [qkv],
        kw,
    )
    q = torch.randn(sum(lens), h, d, device=device, dtype=dtype)
    kv = torch.randn(sum(lens), 2, 2, d, device=device, dtype=dtype)
    check_all(
        "varlen kvpacked",
        dtype,
        lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 64, 64),
        lambda q, kv, baseline: attention(q, kv[:, 0], kv[:, 1], cu_q=cu.cpu(), cu_k=cu.cpu(), baseline=baseline),
        [q, kv],
        dict(kw, causal=False),
    )


def test_empty_rows_are_zero_not_nan(device):
    # causal with sq > sk: the first rows see no key: o = 0, lse = -inf, zero gradient, never NaN.
    dtype = torch.float16
    q = torch.randn(1, 9, 2, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 4, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 4, 2, 32, device=device, dtype=dtype, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out[0, :5].cpu(), torch.zeros(5, 2, 32, dtype=dtype))
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isfinite(lse[0, :, 5:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, :5].cpu(), torch.zeros(5, 2, 32, dtype=dtype))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_nonfinite_inputs_propagate(device):
    # Spec, "Non-finite inputs propagate": a NaN never passes as a masked row (o = 0, lse = -inf).
    dtype = torch.bfloat16
    for d in (64, 128):
        q, k, v = (torch.randn(1, 70, 4, d, device=device, dtype=dtype) for _ in range(3))
        q[0, 3, 1, 5] = float("nan")  # one query row of head 1
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
        assert torch.isnan(out[0, 3, 1]).all() and torch.isnan(lse[0, 1, 3])
        mask = torch.ones(70, 4, dtype=torch.bool, device=device)
        mask[3, 1] = False
        assert torch.isfinite(out[0][mask]).all() and torch.isfinite(lse[0].transpose(0, 1)[mask]).all()
        k2 = k.clone()
        k2[0, 10, 2, 0] = float("nan")  # one key of head 2: every row of head 2 (non-causal) sees it
        out, lse, _ = flash_attn_func(q, k2, v, return_attn_probs=True)
        assert torch.isnan(out[0, :, 2]).all() and torch.isnan(lse[0, 2]).all()
        assert torch.isfinite(out[0, :, 0]).all() and torch.isfinite(lse[0, 0]).all()
        # causal: rows before the bad key never see it and stay finite
        out = flash_attn_func(q, k2, v, causal=True)
        assert torch.isfinite(out[0, :10, 2]).all() and torch.isnan(out[0, 10:, 2]).all()
        # the KV-cache path: a NaN in the cache makes the rows reading it NaN
        kc, vc = k.clone(), v.clone()
        kc[0, 20, 0, 0] = float("nan")
        seqlens = torch.full((1,), 70, dtype=torch.int32, device=device)
        out = flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=seqlens)
        assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 1:]).all()
    # A NaN ALiBi slope: refused where the slopes are read on the host (CPU); on CUDA they stay in device memory
    # and that head's rows are NaN.
    slopes = torch.full((4,), 0.1, device=device)
    slopes[3] = float("nan")
    if device == "cpu":
        with pytest.raises(ValueError, match="alibi_slopes"):
            flash_attn_func(k, k, v, alibi_slopes=slopes)
    else:
        out = flash_attn_func(k, k, v, alibi_slopes=slopes)
        assert torch.isnan(out[0, :, 3]).all() and torch.isfinite(out[0, :, :3]).all()


def test_all_head_dims_forward(device):
    dtype = torch.bfloat16
    for d in (1, 8, 40, 80, 111, 160, 192, 224, 256):
        q, k, v = (torch.randn(1, 33, 2, d, device=device, dtype=dtype) for _ in range(3))
        out = flash_attn_func(q, k, v, causal=True)
        ref = attention(q.double(), k.double(), v.double(), causal=True)[0]
        base = attention(q, k, v, causal=True, baseline=True)[0]
        check(f"head dim {d}", out.cpu(), base.cpu(), ref.cpu())


def test_example_script(device):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "examples", "flash_attn_example.py")
    r = subprocess.run([sys.executable, script, "--device", device], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "within the accuracy rule" in r.stdout, r.stdout


def test_info_reports_the_backends():
    info = flashattn.info()
    assert info["backends"]["cpu"]["usable"] is True
    assert "cuda" in info["backends"]
    assert isinstance(info["kernel_cache"], str)
    assert flashattn.__version__
