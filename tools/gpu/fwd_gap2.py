"""The package's forward at one point (b 4, h 8, s 4k, d 256, bf16), timed by CUDA events after an L2 flush:
through flash_attn_func; through the extension with outputs allocated once; as a CUDA-graph replay (no host
work at all); plus the host time of one call on an idle GPU. Says whether a gap to the kernel's own time
is host work or GPU work."""

import statistics
import sys
import time

import torch

import flashattn
from flashattn import _ops

b, h, s, d = (int(x) for x in (sys.argv[1:5] if len(sys.argv) > 4 else (4, 8, 4096, 256)))
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
out, lse = _ops._outputs(q, False)


def events_ms(fn, reps=30):
    for _ in range(3):
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


def pkg():
    return flashattn.flash_attn_func(q, k, v)


args = (_ops._desc(q, "q"), _ops._desc(k, "k"), _ops._desc(v, "v"), _ops._desc(out, "o"), _ops._desc(lse, "l"))
opts = _ops._opts(None, False, -1, -1, 0.0)
stream = torch.cuda.current_stream().cuda_stream


def ext():
    _ops._ext.fwd(0, stream, *args, opts, None, None)


g = torch.cuda.CUDAGraph()
s_ = torch.cuda.Stream()
s_.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s_):
    pkg()
    with torch.cuda.graph(g):
        gout = pkg()
torch.cuda.current_stream().wait_stream(s_)

with torch.no_grad():
    rows = {"flash_attn_func": events_ms(pkg), "extension only": events_ms(ext), "graph replay": events_ms(g.replay)}
    back_to_back = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            pkg()
        t1 = time.perf_counter()
        back_to_back.append((t1 - t0) / 20 * 1e6)
    host = []
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pkg()
        host.append((time.perf_counter() - t0) * 1e6)
for name, ms in rows.items():
    print(f"b{b} h{h} s{s} d{d}: {name:16s} {ms:.4f} ms (events)")
print(f"host time of one call on an idle GPU: median {statistics.median(host):.1f} us, max {max(host):.1f} us")
print(f"host time per call, 20 back to back: median {statistics.median(back_to_back):.1f} us")
