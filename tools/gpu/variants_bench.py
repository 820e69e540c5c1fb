"""Speed of two of today's variants through the package, against what they cost (issue: sinks and value head
dims), with the harness of `torch_baselines.py` (triton's `do_bench`, medians; forward 25 + 100 ms, forward+backward
10 + 50 ms with the gradients reset):

- `dv`: the (192, 128) head dims of DeepSeek-style attention (q, k 192, v 128), forward and forward+backward, ours
  beside every PyTorch SDPA backend, each tried under `sdpa_kernel` (a backend that refuses the shape is listed with
  its error): 16 heads, 16k tokens, seqlen 1k-16k, causal and not, bf16.
- `sink`: a learnable sink (gpt-oss) against the same problem without one, ours only: 64 query / 8 KV heads, d 64,
  and 16 heads at d 128, 16k tokens, seqlen 1k-16k, causal and not, bf16; the two alternate for `--rounds`
  rounds and the summary compares their medians.

    python3 tools/gpu/variants_bench.py [--grid dv,sink] [--rounds 3] [--json FILE]
"""

import argparse
import functools
import json
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flashattn

warnings.filterwarnings("ignore")  # SDPA explains each refusal as a warning; the error line is kept
DEV, DT = "cuda", torch.bfloat16
SEQS = (1024, 2048, 4096, 8192, 16384)
SDPA = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "fa2": SDPBackend.FLASH_ATTENTION,
    "memeff": SDPBackend.EFFICIENT_ATTENTION,
}


def time_ms(fn, mode, leaves):
    if mode == "fwd":
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
    g = torch.randn_like(fn())

    def step():
        fn().backward(g)

    return do_bench(step, warmup=10, rep=50, return_mode="median", grad_to_none=leaves)


def tensors(b, s, h, hk, d, dv):
    """q, k, v in (b, s, h, d) for ours and their (b, h, s, d) views for SDPA (the same memory)."""
    q = torch.randn(b, s, h, d, device=DEV, dtype=DT, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=DEV, dtype=DT, requires_grad=True)
    v = torch.randn(b, s, hk, dv, device=DEV, dtype=DT, requires_grad=True)
    return q, k, v


def flops(b, s, h, d, dv, causal, mode):
    f = 2 * b * h * s * s * (d + dv) // (2 if causal else 1)
    return f * (1 if mode == "fwd" else 3.5)


def row(rows, p, backend, mode, fn, leaves):
    r = dict(p, backend=backend, mode=mode)
    try:
        ms = time_ms(fn, mode, leaves)
        r.update(
            ms=round(ms, 4),
            tflops=round(flops(p["b"], p["s"], p["h"], p["d"], p["dv"], p["causal"], mode) / ms / 1e9, 1),
        )
    except Exception as e:  # a backend that refuses the shape: its first error line
        r.update(ms=None, tflops=None, err=str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
    rows.append(r)
    shown = f"{r['ms']} ms {r['tflops']} TFLOP/s" if r["ms"] else r["err"]
    print(f"{backend}\t{mode}\t{p}\t{shown}", flush=True)


def point_dv(rows, p):
    q, k, v = tensors(p["b"], p["s"], p["h"], p["hk"], p["d"], p["dv"])
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))

    def sdpa(be):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=p["causal"])

    for mode in ("fwd", "fwd_bwd"):
        row(rows, p, "flashattn", mode, lambda: flashattn.flash_attn_func(q, k, v, causal=p["causal"]), [q, k, v])
        for name, be in SDPA.items():
            row(rows, p, name, mode, functools.partial(sdpa, be), [qt, kt, vt])


def point_sink(rows, p, rounds):
    """Without and with a sink, alternating for `rounds` rounds (the summary takes each side's median): a clock
    drift between two back-to-back timings otherwise reads as the sink's cost."""
    q, k, v = tensors(p["b"], p["s"], p["h"], p["hk"], p["d"], p["dv"])
    sink = torch.randn(p["h"], device=DEV, dtype=torch.float32, requires_grad=True)
    none = functools.partial(flashattn.flash_attn_func, q, k, v, causal=p["causal"])
    with_sink = functools.partial(none, learnable_sink=sink)
    for mode in ("fwd", "fwd_bwd"):
        for rnd in range(rounds):
            p_r = dict(p, round=rnd)
            row(rows, p_r, "flashattn", mode, none, [q, k, v])
            row(rows, p_r, "flashattn+sink", mode, with_sink, [q, k, v, sink])


def grid_dv(rows):
    for causal in (False, True):
        for s in SEQS:
            point_dv(rows, dict(grid="dv", b=16384 // s, s=s, h=16, hk=16, d=192, dv=128, causal=causal))
            torch.cuda.empty_cache()


def grid_sink(rows, rounds):
    for h, hk, d in ((64, 8, 64), (16, 16, 128)):
        for causal in (False, True):
            for s in SEQS:
                point_sink(rows, dict(grid="sink", b=16384 // s, s=s, h=h, hk=hk, d=d, dv=d, causal=causal), rounds)
                torch.cuda.empty_cache()


def median_row(rs):
    """The row of the median time (the lower middle one of an even count), or None."""
    return sorted(rs, key=lambda r: r["ms"])[(len(rs) - 1) // 2] if rs else None


def summary(rows):
    """Ratios: ours against the fastest SDPA backend that ran (dv), with a sink against without (sink)."""
    print("grid\tmode\th/hk\td/dv\tcausal\ts\tours ms\tother ms\tratio (other / ours)\tother")
    keys = sorted({(r["grid"], r["mode"], r["h"], r["d"], r["causal"], r["s"]) for r in rows})
    for g, mode, h, d, causal, s in keys:
        at = [
            r for r in rows if (r["grid"], r["mode"], r["h"], r["d"], r["causal"], r["s"]) == (g, mode, h, d, causal, s)
        ]
        ours = median_row([r for r in at if r["backend"] == "flashattn" and r["ms"]])
        if g == "dv":
            others = [r for r in at if r["backend"] in SDPA and r["ms"]]
            other = min(others, key=lambda r: r["ms"]) if others else None
        else:
            other = median_row([r for r in at if r["backend"] == "flashattn+sink" and r["ms"]])
        if ours and other:
            print(
                f"{g}\t{mode}\t{h}/{ours['hk']}\t{d}/{ours['dv']}\t{int(causal)}\t{s}\t{ours['ms']}\t{other['ms']}\t"
                f"{other['ms'] / ours['ms']:.3f}\t{other['backend']}"
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="dv,sink")
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per sink point (median taken)")
    args = ap.parse_args()
    print(
        json.dumps(
            dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version())
        )
    )
    rows = []
    for g in args.grid.split(","):
        {"dv": grid_dv, "sink": functools.partial(grid_sink, rounds=args.rounds)}[g](rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    summary(rows)


if __name__ == "__main__":
    main()
