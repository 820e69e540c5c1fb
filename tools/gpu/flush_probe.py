"""Why the package's forward reads up to 9% slower than `flashattn bench` at some standard-grid points (issue 16)
while ncu shows the same single kernel, launch shape and cycle count for both (docs/notes/python.md).

Times the package's `flash_attn_func` (and cuDNN through SDPA, as a control) at four points with triton's
`do_bench` (torch_baselines.py's harness) and with the same loop under other conditions: the L2 flushed by
`Tensor.zero_()` (do_bench's), by a fill kernel of ones, or by the driver's `cuMemsetD8Async` (the CLI's), and
with the warm-up calls flushed too (the CLI's warm-up; do_bench warms up back to back). The CLI's own figures
for the same points come from `flashattn bench --shape ...` in the same call (python.sh step `flushprobe`).

    python3 flush_probe.py OUT.json
"""

import ctypes
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flashattn

POINTS = [(8, 16, 2048, 128, False), (4, 16, 4096, 128, False), (4, 32, 4096, 64, True), (1, 16, 16384, 128, False)]
FLUSH_BYTES = 256 * 2**20


def functions(b, h, s, d, causal):
    """The package's forward and cuDNN's (SDPA), on the same random bf16 inputs."""
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return {"package": lambda: flashattn.flash_attn_func(q, k, v, causal=causal), "cudnn": cudnn}


def main(path):
    cu = ctypes.CDLL("libcuda.so.1")
    cu.cuMemsetD8Async.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t, ctypes.c_void_p]
    cache = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    flushes = {
        "zero_": lambda: cache.zero_(),
        "fill_1": lambda: cache.fill_(1),
        "driver_memset": lambda: cu.cuMemsetD8Async(
            cache.data_ptr(), 0, FLUSH_BYTES, torch.cuda.current_stream().cuda_stream
        ),
    }

    def loop(fn, flush, flushed_warmup, warm=25, rep=100):
        for _ in range(warm):
            if flushed_warmup:
                flush()
            fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        for s, e in ev:
            flush()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in ev)

    rows = []
    for point in POINTS:
        for name, fn in functions(*point).items():
            b, h, s, d, causal = point
            r = dict(b=b, h=h, s=s, d=d, causal=causal, fn=name)
            with torch.no_grad():
                r["do_bench"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
                for fl, f in flushes.items():
                    r[fl] = loop(fn, f, False)
                    r[fl + "+flushed_warmup"] = loop(fn, f, True)
                r["do_bench_again"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
            rows.append(r)
            print(json.dumps(r), flush=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
