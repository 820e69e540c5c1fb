"""flashattn as PyTorch SDPA's flash backend (`flashattn.sdpa`).

On CUDA: after `activate()`, `F.scaled_dot_product_attention` calls that PyTorch routes to its flash backend run
our kernels (the call counters prove it), forward and backward, against the float64 reference; `restore()` gives
PyTorch's kernels back. On the CPU (where SDPA never reaches the flash operators): the operator implementations
themselves against the reference, and the registration round trip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ref import attention
from test_attention import check_all

import flashattn.sdpa as fsdpa

attn_api = pytest.importorskip("torch.nn.attention")
needs_registry = pytest.mark.skipif(
    not hasattr(attn_api, "register_flash_attention_impl"), reason="PyTorch < 2.11: no flash implementation registry"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's flash backend runs on CUDA only")

# (b, h, hk, sq, sk, d, causal, dtype)
SHAPES = [
    (2, 4, 4, 130, 130, 64, False, torch.bfloat16),
    (2, 4, 4, 257, 257, 128, True, torch.float16),
    (1, 8, 2, 100, 333, 128, False, torch.bfloat16),  # GQA
    (2, 2, 2, 77, 77, 40, True, torch.bfloat16),  # head dim padded to 48 by PyTorch before the operator
]


def bhsd(fn):
    """`fn` on (b, h, s, d) tensors seen from (b, s, h, d) ones, as the reference and check_all take them."""
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_operators_match_the_reference(device, case):
    # The two replaced operators called directly (any device): forward output and lse, backward gradients.
    b, h, hk, sq, sk, d, causal, dtype = SHAPES[case]
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse, *_ = fsdpa._forward(q, k, v, is_causal=causal)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, out, lse = ctx.saved_tensors
            return fsdpa._backward(g, q, k, v, out, lse, None, None, 0, 0, 0.0, causal, None, None)

    r = fsdpa._forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    assert r[4] == sq and r[5] == sk and r[2] is None and r[3] is None
    assert r[0].stride() == torch.empty_like(q.transpose(1, 2)).stride()  # laid out like the query
    kw = dict(causal=causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    check_all(
        f"sdpa operators {SHAPES[case]}",
        dtype,
        bhsd(Op.apply),
        lambda q, k, v, baseline: attention(q, k, v, causal=causal, baseline=baseline),
        [q, k, v],
        kw,
        lse_ours=r[1],
    )


def test_operators_refuse_what_they_do_not_run(device):
    q = torch.randn(1, 2, 8, 32, device=device, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dropout"):
        fsdpa._forward(q, q, q, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="return_debug_mask"):
        fsdpa._forward(q, q, q, return_debug_mask=True)
    with pytest.raises(RuntimeError, match="value head dim"):
        fsdpa._forward(q, q, q[..., :16])


@needs_registry
def test_activate_and_restore_round_trip():
    assert fsdpa.activate() == "flashattn"
    try:
        assert fsdpa.active() and attn_api.current_flash_attention_impl() == "flashattn"
        assert "flashattn" in attn_api.list_flash_attention_impls()
        fsdpa.activate()  # twice is fine
        assert fsdpa.active()
    finally:
        fsdpa.restore()
    assert not fsdpa.active()
    fsdpa.restore()  # restoring when not active does nothing


@needs_registry
@needs_cuda
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_sdpa_runs_our_kernels(case):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, hk, sq, sk, d, causal, dtype = SHAPES[case]
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != hk)

    fsdpa.activate()
    try:
        before = dict(fsdpa.calls)
        kw = dict(causal=causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
        check_all(
            f"sdpa {SHAPES[case]}",
            dtype,
            bhsd(sdpa),
            lambda q, k, v, baseline: attention(q, k, v, causal=causal, baseline=baseline),
            [q, k, v],
            kw,
        )
        assert fsdpa.calls["forward"] > before["forward"] and fsdpa.calls["backward"] > before["backward"]
    finally:
        fsdpa.restore()
    before = dict(fsdpa.calls)
    sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert fsdpa.calls == before, "restore() left our operators in place"


@needs_registry
@needs_cuda
def test_multihead_attention_trains_on_our_kernels():
    # PyTorch picks the SDPA backend (on the H100, PyTorch 2.11 chose another one than flash for this module):
    # sdpa_kernel makes it the flash backend, which is what activate() replaces.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = torch.nn.MultiheadAttention(256, 4, batch_first=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 200, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref_out, _ = mha(x, x, x, need_weights=False)
    ref_out.float().square().sum().backward()
    ref_grad = x.grad.clone()
    x.grad = None
    fsdpa.activate()
    try:
        before = dict(fsdpa.calls)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out, _ = mha(x, x, x, need_weights=False)
        out.float().square().sum().backward()
        assert fsdpa.calls["forward"] > before["forward"] and fsdpa.calls["backward"] > before["backward"]
    finally:
        fsdpa.restore()
    # Same module, PyTorch's kernels against ours: bf16 rounding apart, the same result.
    assert (out.float() - ref_out.float()).abs().max().item() < 3e-2
    assert (x.grad.float() - ref_grad.float()).abs().max().item() < 5e-2 * max(ref_grad.abs().max().item(), 1.0)
