"""The CPU backend against PyTorch's CPU attention (`scaled_dot_product_attention`), same machine, same
process run, same thread count, point by point (torch then ours at each point, so both see the same load).

Shapes (1, H, s, d); forward and forward+backward; causal and not; bf16 and f32. Ours runs through the CLI
(`flashattn bench --device cpu`, median of --reps after one warm-up) with RAYON_NUM_THREADS=--threads; torch
with torch.set_num_threads(--threads), median of --reps after one warm-up. Prints a markdown table with the
ratio torch_ms / ours_ms (above 1: ours is faster).

    cargo build --release -p flashattn-cli
    python tools/cpu_bench.py                      # issue grid: s 1k,4k,16k; d 64,128 (long)
    python tools/cpu_bench.py --seqlens 1k,4k --dtypes f32 --modes fwd
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def parse_len(x):
    x = x.strip().lower()
    return int(x[:-1]) * 1024 if x.endswith("k") else int(x)


def torch_ms(torch, b, h, s, d, causal, dtype, mode, reps):
    import torch.nn.functional as F

    q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))
    if mode == "fwd_bwd":
        for t in (q, k, v):
            t.requires_grad_(True)
        g = torch.randn(b, h, s, d, dtype=dtype)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            o.backward(g)
            for t in (q, k, v):
                t.grad = None

    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def ours_ms(binary, b, h, s, d, causal, dtype, mode, reps, threads):
    cmd = [binary, "bench", "--device", "cpu", "--shape", f"{b},{h},{s},{d}", "--dtype", dtype,
           "--causal", str(int(causal)), "--modes", mode, "--reps", str(reps)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "flashattn" and f[1] == mode:
            return float(f[9])
    raise RuntimeError(f"no result in:\n{out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="1k,4k,16k")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    ap.add_argument("--bin", default=os.path.join(target, "release", "flashattn"))
    a = ap.parse_args()

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    tdt = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}
    print(f"torch {torch.__version__}, threads {a.threads} (torch.set_num_threads, RAYON_NUM_THREADS)",
          file=sys.stderr)
    print("| dtype | s | d | causal | mode | ours ms | torch ms | torch/ours |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        for s in map(parse_len, a.seqlens.split(",")):
            for d in map(int, a.dims.split(",")):
                for causal in (bool(int(c)) for c in a.causal.split(",")):
                    for mode in a.modes.split(","):
                        t = torch_ms(torch, 1, a.heads, s, d, causal, tdt[dtype], mode, a.reps)
                        o = ours_ms(a.bin, 1, a.heads, s, d, causal, dtype, mode, a.reps, a.threads)
                        print(f"| {dtype} | {s} | {d} | {int(causal)} | {mode} | {o:.1f} | {t:.1f} | {t / o:.2f} |",
                              flush=True)


if __name__ == "__main__":
    main()
