"""The spec's semantics written plainly in torch, and its accuracy rule.

`attention` computes one batch of attention with the spec's scores (scale, softcap, ALiBi, bottom-right masks, GQA)
in any dtype: in float64 it is the oracle; in the input dtype (scores in float32, `p` rounded to the input dtype
before `p @ v`) it is the same-precision baseline the rule compares against.
"""

from __future__ import annotations

import math

import torch


def visible(sq: int, sk: int, causal: bool, window, device) -> torch.Tensor:
    """`[sq, sk]` bool: key j visible to query i (bottom-right aligned)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    off = sk - sq
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i + off - left
    if right >= 0:
        ok &= j <= i + off + right
    return ok


def attention_one(q, k, v, scale, causal, window, softcap, slopes, baseline: bool, sink=None):
    """One sequence: q `[sq, h, d]`, k/v `[sk, hk, d]`, slopes `[h]` or None, sink `[h]` or None (a logit per
    head in every row's softmax denominator, with no value).

    Returns (o `[sq, h, d]`, lse `[h, sq]`)."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    g = h // hk
    work = torch.float32 if baseline else torch.float64
    qf, kf, vf = q.to(work), k.to(work), v.to(work)
    kf = kf.repeat_interleave(g, dim=1)
    vf = vf.repeat_interleave(g, dim=1)
    s = torch.einsum("ihd,jhd->hij", qf, kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        dist = (i + sk - sq - j).abs().to(work)
        s = s - slopes.to(work)[:, None, None] * dist
    ok = visible(sq, sk, causal, window, q.device)
    s = s.masked_fill(~ok, float("-inf"))
    if sink is not None:
        # One extra column per row: the sink's logit; its probability is dropped after the softmax.
        col = sink.to(work)[:, None, None].expand(h, sq, 1)
        s = torch.cat([s, col], dim=-1)
        vf = torch.cat([vf, torch.zeros(1, h, vf.shape[-1], dtype=work, device=q.device)])
    if sk == 0 and sink is None:
        o = torch.zeros(sq, h, v.shape[-1], dtype=work, device=q.device) + 0 * qf.sum()
        return o, torch.full((h, sq), float("-inf"), dtype=work, device=q.device)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    lse = (torch.log(den) + m).squeeze(-1)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    if baseline:
        p = p.to(q.dtype).to(work)
    o = torch.einsum("hij,jhd->ihd", p, vf)
    return o, lse


def attention(
    q,
    k,
    v,
    scale=None,
    causal=False,
    window=(-1, -1),
    softcap=0.0,
    alibi=None,
    cu_q=None,
    cu_k=None,
    seqused_k=None,
    baseline=False,
    sink=None,
):
    """Dense `[b, s, h, d]` or varlen `[total, h, d]` attention. Returns (o, lse) in the working precision (lse
    `[b, h, sq]` or `[h, total_q]`)."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if cu_q is None:
        outs, lses = [], []
        for bi in range(q.shape[0]):
            sl = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[bi])
            o, lse = attention_one(q[bi], k[bi], v[bi], scale, causal, window, softcap, sl, baseline, sink)
            outs.append(o)
            lses.append(lse)
        return torch.stack(outs), torch.stack(lses)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for bi in range(len(cq) - 1):
        kend = ck[bi + 1] if seqused_k is None else ck[bi] + int(seqused_k[bi])
        sl = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[bi])
        o, lse = attention_one(
            q[cq[bi] : cq[bi + 1]], k[ck[bi] : kend], v[ck[bi] : kend], scale, causal, window, softcap, sl, baseline,
            sink,
        )  # fmt: skip
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(a), fin):
        return math.inf
    if fin.sum() == 0:
        return 0.0
    return (a[fin] - ref[fin]).abs().max().item()


def check(name: str, out: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, factor: float = 2.0) -> None:
    """The spec's rule: `max|out - ref| <= factor * max|baseline - ref| + 1e-5` (f32: 1e-4 relative)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    e = err(out, ref)
    if out.dtype == torch.float32:
        bound = 1e-4 * max(ref.abs().max().item(), 1.0)
    else:
        bound = factor * err(base, ref) + 1e-5
    assert e <= bound, f"{name}: max error {e:.3g} > bound {bound:.3g}"


def check_lse(name: str, lse: torch.Tensor, ref: torch.Tensor) -> None:
    """`lse` within 1e-3 where finite, `-inf` exactly where the row is empty."""
    assert lse.shape == ref.shape, f"{name}: lse shape {tuple(lse.shape)}, expected {tuple(ref.shape)}"
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse.cpu()), empty.cpu()), f"{name}: lse -inf where it should not be (or not)"
    fin = ~empty
    if fin.any():
        e = (lse.double()[fin] - ref.double()[fin]).abs().max().item()
        assert e <= 1e-3, f"{name}: lse error {e:.3g} > 1e-3"


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of `x` `[..., d]` by table rows `cos`, `sin` `[..., rot/2]` (broadcast), in float64."""
    half = cos.shape[-1]
    rot = 2 * half
    x = x.double()
    c, s = cos.double(), sin.double()
    out = x.clone()
    if interleaved:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        out[..., 0:rot:2] = a * c - b * s
        out[..., 1:rot:2] = a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:rot]
        out[..., :half] = a * c - b * s
        out[..., half:rot] = a * s + b * c
    return out
