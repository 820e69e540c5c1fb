"""Host time per call at a tiny decode shape (b 1, KV cache 4k, 32 query / 8 KV heads, d 128, bf16): the
package's `flash_attn_with_kvcache` and `flash_attn_func` beside `F.scaled_dot_product_attention`, in one
process. Each figure is the median over rounds of (wall time of N back-to-back calls) / N, with the GPU kept
busy enough that the host is the bottleneck: that is the Python + dispatch + launch cost of one call.

    python3 tools/gpu/overhead.py [--json FILE]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import flashattn


def host_us(fn, n=2000, rounds=7):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        per.append((t1 - t0) / n * 1e6)
    return statistics.median(per)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    b, h, hk, d, sk = 1, 32, 8, 128, 4096
    q = torch.randn(b, 1, h, d, device=dev, dtype=dt)
    kc = torch.randn(b, sk, hk, d, device=dev, dtype=dt)
    vc = torch.randn(b, sk, hk, d, device=dev, dtype=dt)
    seqlens = torch.full((b,), sk, dtype=torch.int32, device=dev)
    qs, ks, vs = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    op = torch.ops.flashattn.kvcache
    op_args = (q, kc, vc, None, None, seqlens, None, None, None, None, None, True, None, None, False, -1, -1, 0.0)
    # The extension alone, outputs allocated once (it reads and checks the tensors, allocates the workspace,
    # zeroes its header and launches the kernels).
    from flashattn import _flashattn as ext
    from flashattn import _ops

    out, lse = _ops._outputs(q, vc, False)
    ext_args = (q, kc, vc, None, None, seqlens, None, None, None, None, None, True, None, None, False, -1, -1, 0.0)
    rows = {
        "flash_attn_with_kvcache": host_us(lambda: flashattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)),
        "torch.ops.flashattn.kvcache": host_us(lambda: op(*op_args)),
        "extension call only": host_us(lambda: ext.kvcache(*ext_args, None, out, lse, 0, None, None, None, False)),
        "flash_attn_func": host_us(lambda: flashattn.flash_attn_func(q, kc, vc)),
        "sdpa (default backend)": host_us(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)),
        "torch.empty (a floor)": host_us(lambda: torch.empty(b, 1, h, d, device=dev, dtype=dt)),
        "out + lse allocation": host_us(lambda: _ops._outputs(q, vc, False)),
        "torch.cuda.current_stream": host_us(lambda: torch.cuda.current_stream(q.device).cuda_stream),
    }

    # The Python layer alone: the same calls with the extension replaced by a stand-in that returns at once.
    class Stub:
        def __getattr__(self, name):
            return lambda *a: (None, None)

    real, _ops._ext = _ops._ext, Stub()
    try:
        rows["flash_attn_with_kvcache, extension stubbed"] = host_us(
            lambda: flashattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)
        )
        rows["flash_attn_func, extension stubbed"] = host_us(lambda: flashattn.flash_attn_func(q, kc, vc))
    finally:
        _ops._ext = real
    for k, v in rows.items():
        print(f"{k:44s} {v:7.1f} us/call")
    if args.json:
        json.dump(
            dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, us_per_call=rows),
            open(args.json, "w"),
            indent=1,
        )


if __name__ == "__main__":
    main()
