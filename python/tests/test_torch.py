"""PyTorch integration: `torch.library.opcheck` of every op, `torch.compile(fullgraph=True)` of a block that calls
the three entry points, and a paged decode step captured in a CUDA graph and replayed with new cache lengths."""

from __future__ import annotations

import pytest
import torch

import flashattn  # noqa: F401  (registers torch.ops.flashattn)
from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache


def fwd_args(device, varlen=False, alibi=False, dtype=torch.bfloat16):
    h, hk, d = 4, 2, 64
    if varlen:
        cu = torch.tensor([0, 7, 7, 40], dtype=torch.int32, device=device)
        q = torch.randn(40, h, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(40, hk, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(40, hk, d, device=device, dtype=dtype, requires_grad=True)
        meta = (cu, cu, None, 33, 33)
    else:
        q = torch.randn(2, 33, h, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 40, hk, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 40, hk, d, device=device, dtype=dtype, requires_grad=True)
        meta = (None, None, None, 0, 0)
    slopes = torch.rand(h, device=device) * 0.3 if alibi else None
    return (q, k, v, slopes, *meta, None, True, -1, -1, 0.0, False)


@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck_fwd_bwd(device, varlen):
    args = fwd_args(device, varlen=varlen, alibi=not varlen)
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args)
    out, lse = torch.ops.flashattn.fwd(*args)
    q, k, v = args[:3]
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    torch.library.opcheck(torch.ops.flashattn.bwd.default, bwd_args)


def test_opcheck_kvcache(device):
    dtype = torch.float16
    q = torch.randn(2, 1, 4, 32, device=device, dtype=dtype)
    kc = torch.randn(6, 5, 2, 32, device=device, dtype=dtype)  # pages of 5
    vc = torch.randn(6, 5, 2, 32, device=device, dtype=dtype)
    kn = torch.randn(2, 1, 2, 32, device=device, dtype=dtype)
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([4, 9], dtype=torch.int32, device=device)
    args = (q, kc, vc, kn, kn.clone(), seqlens, table, None, None, None, None, True, None, None, True, -1, -1, 0.0)
    # The op appends in place: every run writes the same rows with the same values.
    torch.library.opcheck(torch.ops.flashattn.kvcache.default, args)


class Block(torch.nn.Module):
    def __init__(self, h, d):
        super().__init__()
        self.h, self.d = h, d
        self.qkv = torch.nn.Linear(h * d, 3 * h * d)
        self.proj = torch.nn.Linear(h * d, h * d)

    def forward(self, x, cu, max_s, k_cache, v_cache, seqlens):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.d).unbind(2)
        o1 = flash_attn_func(q, k, v, causal=True)
        o2 = flash_attn_varlen_func(
            q.reshape(b * s, self.h, self.d),
            k.reshape(b * s, self.h, self.d),
            v.reshape(b * s, self.h, self.d),
            cu,
            cu,
            max_s,
            max_s,
            causal=True,
        )
        o3 = flash_attn_with_kvcache(
            q[:, -1:].detach(),
            k_cache,
            v_cache,
            k[:, -1:].detach(),
            v[:, -1:].detach(),
            cache_seqlens=seqlens,
            causal=True,
        )
        y = o1 + o2.view(b, s, self.h, self.d) + o3
        return self.proj(y.reshape(b, s, self.h * self.d))


def test_compile_fullgraph(device):
    dtype = torch.bfloat16
    h, d, b, s = 4, 32, 2, 24
    torch.manual_seed(0)
    block = Block(h, d).to(device=device, dtype=dtype)
    x = torch.randn(b, s, h * d, device=device, dtype=dtype)
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32, device=device)
    kc = torch.randn(b, 64, h, d, device=device, dtype=dtype)
    vc = torch.randn(b, 64, h, d, device=device, dtype=dtype)
    seqlens = torch.tensor([5, 30], dtype=torch.int32, device=device)
    kc_e, vc_e = kc.clone(), vc.clone()
    eager = block(x, cu, s, kc_e, vc_e, seqlens)
    eager.float().sum().backward()
    g_eager = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    # Inductor needs a C++ compiler for CPU code; aot_eager traces the same graph (fakes, autograd) without one.
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(x, cu, s, kc, vc, seqlens)
    out.float().sum().backward()
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    for p, ge in zip(block.parameters(), g_eager):
        torch.testing.assert_close(p.grad, ge, rtol=5e-2, atol=5e-2)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e), "the compiled block's append differs from eager's"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_replay():
    dev, dtype = "cuda", torch.bfloat16
    b, h, hk, d, page, pages_per_seq = 3, 8, 2, 64, 16, 8
    n_pages = b * pages_per_seq
    kc = torch.randn(n_pages, page, hk, d, device=dev, dtype=dtype)
    vc = torch.randn(n_pages, page, hk, d, device=dev, dtype=dtype)
    table = torch.randperm(n_pages, device=dev).to(torch.int32).view(b, pages_per_seq)
    q = torch.randn(b, 1, h, d, device=dev, dtype=dtype)
    kn = torch.randn(b, 1, hk, d, device=dev, dtype=dtype)
    vn = torch.randn(b, 1, hk, d, device=dev, dtype=dtype)
    seqlens = torch.tensor([3, 40, 100], dtype=torch.int32, device=dev)

    def step():
        return flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table, causal=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # loads the kernels before capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for lens in ([4, 41, 101], [0, 7, 127], [50, 60, 70]):
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        kn.copy_(torch.randn_like(kn))
        vn.copy_(torch.randn_like(vn))
        kc_ref, vc_ref = kc.clone(), vc.clone()
        expected = flash_attn_with_kvcache(
            q, kc_ref, vc_ref, kn, vn, cache_seqlens=seqlens, block_table=table, causal=True
        )
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected), f"replay with lengths {lens} differs from an eager call"
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), f"replay with lengths {lens}: cache differs"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_training_step():
    dev, dtype = "cuda", torch.float16
    q = torch.randn(2, 128, 4, 64, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 128, 4, 64, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 128, 4, 64, device=dev, dtype=dtype, requires_grad=True)
    dout = torch.randn(2, 128, 4, 64, device=dev, dtype=dtype)

    def step():
        o = flash_attn_func(q, k, v, causal=True)
        o.backward(dout)
        return o

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
            q.grad = k.grad = v.grad = None
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    with torch.no_grad():
        q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    dq_graph = q.grad.clone()
    q2 = q.detach().clone().requires_grad_()
    o2 = flash_attn_func(q2, k.detach(), v.detach(), causal=True)
    o2.backward(dout)
    assert torch.equal(out, o2)
    torch.testing.assert_close(dq_graph, q2.grad, rtol=0, atol=1e-3)


def test_eager_path_equals_the_op(device):
    """Plain eager calls skip the dispatcher (same implementation); the op gives bit-identical results."""
    args = (*fwd_args(device, varlen=True)[:-1], True)  # deterministic: bit-identical gradients run to run
    q, k, v = args[:3]
    out_op, lse_op = torch.ops.flashattn.fwd(*args)
    out, lse = flashattn._ops.attention(*args)
    assert torch.equal(out, out_op) and torch.equal(lse, lse_op)
    dout = torch.randn_like(out)
    g_op = torch.autograd.grad(out_op, (q, k, v), dout)
    g = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(g, g_op):
        assert torch.equal(a, b)
