"""Where the package's forward differs from `flashattn bench` (issue 16): at a few standard-grid points, the
package's `flash_attn_func` timed three ways (triton's do_bench as torch_baselines.py does; CUDA events around
the call after an L2-flush memset, as the CLI does; the profiler's kernel durations), next to PyTorch's FA2
kernel timed the second way. Prints one line per point and method; the CLI's figures come from
`flashattn bench --shape ...` in the same device call.

    python3 tools/gpu/fwd_gap.py
"""

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import flashattn

POINTS = [(2, 16, 8192, 128, False), (4, 32, 4096, 64, True), (1, 16, 16384, 128, False), (4, 8, 4096, 256, False)]


def events_ms(fn, flush, reps=40):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def kernels(fn, flush, reps=10):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and "zero" not in e.key.lower() and "fill" not in e.key.lower():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            out[e.key[:60]] = (e.count, t / max(e.count, 1) / 1e3)
    return out


def point(flush, b, h, s, d, causal):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    flops = 4 * b * h * s * s * d / (2 if causal else 1)

    def ours():
        return flashattn.flash_attn_func(qs, ks, vs, causal=causal)

    def fa2():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with torch.no_grad():
        rows = {
            "ours do_bench": do_bench(ours, warmup=25, rep=100, return_mode="median"),
            "ours events": events_ms(ours, flush),
            "fa2 events": events_ms(fa2, flush),
        }
        found = kernels(ours, flush)
    tag = f"b{b} h{h} s{s} d{d} causal={int(causal)}"
    for name, ms in rows.items():
        print(f"{tag} {name:14s} {ms:.4f} ms {flops / ms / 1e9:.1f} TFLOP/s")
    for name, (n, ms) in found.items():
        print(f"{tag} kernel {name} x{n} {ms:.4f} ms {flops / ms / 1e9:.1f} TFLOP/s")


def main():
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for p in POINTS:
        point(flush, *p)


if __name__ == "__main__":
    main()
