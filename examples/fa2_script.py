"""A script written for FlashAttention-2, kept unchanged: it imports `flash_attn`, not flashattn.

flashattn's drop-in serves those imports, with no edit to this file:

    python -m flashattn.compat examples/fa2_script.py

It calls `flash_attn_func` (causal, grouped-query heads) and, on a padded batch, `unpad_input`,
`flash_attn_varlen_func` and `pad_input`, and checks each result against attention written out in float64 with
the accuracy rule of examples/flash_attn_example.py (at most twice the error of naive float16 attention). Runs on
the GPU when there is one, else on the CPU (which FlashAttention-2 itself cannot, and flashattn can). Exit
status 0 when both results are within the rule.
"""

import math

import torch
from flash_attn import __version__, flash_attn_func, flash_attn_varlen_func
from flash_attn.bert_padding import pad_input, unpad_input


def attention(q, k, v, causal, dtype):
    """softmax(q k^T / sqrt(d)) v over the key axis, GQA by repeating k and v; probabilities rounded to `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q.to(work), k.to(work)) / math.sqrt(q.shape[-1])
    if causal:
        s, t = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(dtype)
    return torch.einsum("bhst,bthd->bshd", p.to(work), v.to(work))


def within_rule(name, out, q, k, v, causal):
    """Prints the largest error of `out` and whether it is at most twice that of naive float16 attention."""
    ref = attention(q, k, v, causal, torch.float64)
    naive = attention(q, k, v, causal, torch.float16)
    err = (out.double() - ref).abs().max().item()
    naive_err = (naive.double() - ref).abs().max().item()
    ok = err <= 2 * naive_err + 1e-5
    print(f"{name}: max error {err:.3e} (naive float16: {naive_err:.3e}) {'ok' if ok else 'OUTSIDE the rule'}")
    return ok


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    batch, seqlen, nheads, nheads_k, headdim = 2, 96, 8, 2, 64
    q = torch.randn(batch, seqlen, nheads, headdim, dtype=torch.float16, device=device)
    k, v = (torch.randn(batch, seqlen, nheads_k, headdim, dtype=torch.float16, device=device) for _ in range(2))
    print(f"flash_attn {__version__} on {device}")

    out = flash_attn_func(q, k, v, causal=True)
    ok = within_rule("flash_attn_func (causal, GQA 8/2)", out, q, k, v, causal=True)

    # A padded batch: the second sequence keeps its first 57 tokens.
    lengths = torch.tensor([seqlen, 57], device=device)
    mask = torch.arange(seqlen, device=device)[None, :] < lengths[:, None]
    q_u, indices, cu_seqlens, max_seqlen, _ = unpad_input(q, mask)
    k_u, _, _, _, _ = unpad_input(k, mask)
    v_u, _, _, _, _ = unpad_input(v, mask)
    out_u = flash_attn_varlen_func(q_u, k_u, v_u, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    out_pad = pad_input(out_u, indices, batch, seqlen)
    for b, n in enumerate(lengths.tolist()):
        sl = slice(b, b + 1), slice(0, n)
        ok &= within_rule(f"flash_attn_varlen_func, sequence {b} ({n} tokens)", out_pad[sl], q[sl], k[sl], v[sl], True)

    print("all within the accuracy rule" if ok else "OUTSIDE the accuracy rule")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
