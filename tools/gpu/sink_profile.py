"""The backward kernels of one forward+backward with and without a learnable sink, for ncu (issue: sinks within 3%
of no sink). Run under `ncu --profile-from-start off`: each case's first iteration is a warm-up (kernel compiles),
the second runs between cudaProfilerStart/Stop.

    ncu --profile-from-start off -k regex:flash_bwd --section SpeedOfLight --section InstructionStats \\
        python3 tools/gpu/sink_profile.py [--b 16 --s 1024 --h 16 --hk 16 --d 128] [--causal]
"""

import argparse

import torch

import flashattn

ap = argparse.ArgumentParser()
ap.add_argument("--b", type=int, default=16)
ap.add_argument("--s", type=int, default=1024)
ap.add_argument("--h", type=int, default=16)
ap.add_argument("--hk", type=int, default=16)
ap.add_argument("--d", type=int, default=128)
ap.add_argument("--causal", action="store_true")
a = ap.parse_args()
dt = torch.bfloat16
q = torch.randn(a.b, a.s, a.h, a.d, device="cuda", dtype=dt, requires_grad=True)
k = torch.randn(a.b, a.s, a.hk, a.d, device="cuda", dtype=dt, requires_grad=True)
v = torch.randn(a.b, a.s, a.hk, a.d, device="cuda", dtype=dt, requires_grad=True)
sink = torch.randn(a.h, device="cuda", dtype=torch.float32, requires_grad=True)
g = torch.randn(a.b, a.s, a.h, a.d, device="cuda", dtype=dt)
for name, s in (("none", None), ("sink", sink)):
    for it in range(2):
        if it == 1:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        flashattn.flash_attn_func(q, k, v, causal=a.causal, learnable_sink=s).backward(g)
        if it == 1:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    print(name, "done", flush=True)
