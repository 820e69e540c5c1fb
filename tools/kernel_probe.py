#!/usr/bin/env python3
"""GPU probe for kernels/fwd.cu: correctness against a float64 reference (docs spec ATTENTION.md accuracy rule)
and a TFLOP/s benchmark next to PyTorch's SDPA flash backend. Needs a GPU, PyTorch and libnvrtc/libcuda.

  python3 tools/kernel_probe.py [--quick] [--bench] [--no-check] [--arch sm_90] [--out DIR]

The kernel is compiled with tools/nvrtc_compile.py (NVRTC -> cubin) and launched through the CUDA driver API
(ctypes) on PyTorch's current stream, with FwdParams built as a ctypes Structure mirroring params.cuh.
"""
import argparse
import ctypes
import math
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import nvrtc_compile  # noqa: E402

KDIR = os.path.join(HERE, "..", "crates", "flashattn", "kernels")
FWD_SRC = os.path.join(KDIR, "fwd.cu")


class FwdParams(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("q_batch_stride", ctypes.c_int64), ("q_row_stride", ctypes.c_int64), ("q_head_stride", ctypes.c_int64),
        ("k_batch_stride", ctypes.c_int64), ("k_row_stride", ctypes.c_int64), ("k_head_stride", ctypes.c_int64),
        ("v_batch_stride", ctypes.c_int64), ("v_row_stride", ctypes.c_int64), ("v_head_stride", ctypes.c_int64),
        ("o_batch_stride", ctypes.c_int64), ("o_row_stride", ctypes.c_int64), ("o_head_stride", ctypes.c_int64),
        ("lse_batch_stride", ctypes.c_int64), ("lse_head_stride", ctypes.c_int64),
        ("b", ctypes.c_int), ("h", ctypes.c_int), ("hk", ctypes.c_int), ("sq", ctypes.c_int), ("sk", ctypes.c_int),
        ("d", ctypes.c_int),
        ("cu_seqlens_q", ctypes.c_void_p), ("cu_seqlens_k", ctypes.c_void_p), ("seqused_k", ctypes.c_void_p),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
        ("alibi_slopes", ctypes.c_void_p), ("alibi_batch_stride", ctypes.c_int64),
        ("window_left", ctypes.c_int), ("window_right", ctypes.c_int),
    ]


# ------------------------------------------------------------------ driver API
_cuda = None


def cuda():
    global _cuda
    if _cuda is None:
        _cuda = ctypes.CDLL("libcuda.so.1")
    return _cuda


def ck(r, what):
    if r != 0:
        s = ctypes.c_char_p()
        cuda().cuGetErrorString(r, ctypes.byref(s))
        raise RuntimeError(f"{what}: {r} {s.value}")


def ensure_ctx():
    torch.zeros(1, device="cuda")
    ctx = ctypes.c_void_p()
    ck(cuda().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        dev = ctypes.c_int()
        ck(cuda().cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        ck(cuda().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
        ck(cuda().cuCtxSetCurrent(ctx), "setcurrent")


TILE_DEFAULTS = {32: (128, 128, 4), 64: (128, 128, 4), 96: (128, 64, 4), 128: (128, 64, 4),
                 160: (128, 64, 8), 192: (128, 64, 8), 224: (128, 64, 8), 256: (128, 64, 8)}


def compile_variant(defs, arch):
    src = open(FWD_SRC).read()
    opts = nvrtc_compile.build_opts(arch, [f"{k}={v}" for k, v in sorted(defs.items())], [KDIR], [])
    t0 = time.time()
    ok, log, cubin = nvrtc_compile.compile_source(src, "fwd.cu", opts)
    return ok, log, cubin, time.time() - t0


class Kernel:
    cache = {}
    compiled = {}      # key -> (ok, log, cubin, seconds), filled in parallel by precompile()
    collect = None     # a set while collecting the variants a pass will need

    @classmethod
    def precompile(cls, keys, arch, workers=16):
        from concurrent.futures import ThreadPoolExecutor
        todo = [k for k in keys if (k, arch) not in cls.compiled]
        with ThreadPoolExecutor(workers) as ex:
            for k, r in zip(todo, ex.map(lambda kk: compile_variant(dict(kk), arch), todo)):
                cls.compiled[(k, arch)] = r

    def __init__(self, defs, arch):
        self.defs = dict(defs)
        key = (tuple(sorted(defs.items())), arch)
        if key not in Kernel.compiled:
            Kernel.compiled[key] = compile_variant(self.defs, arch)
        ok, log, cubin, dt = Kernel.compiled[key]
        if not ok:
            raise RuntimeError(f"compile failed {defs}:\n{log}")
        self.usage = nvrtc_compile.parse_usage(log)
        self.compile_s = dt
        self.mod = ctypes.c_void_p()
        ck(cuda().cuModuleLoadData(ctypes.byref(self.mod), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        self.fn = ctypes.c_void_p()
        ck(cuda().cuModuleGetFunction(ctypes.byref(self.fn), self.mod, b"flash_fwd"), "getfunction")
        hd = self.defs["HEAD_DIM"]
        bm, bn, nw = TILE_DEFAULTS[hd]
        self.bm = self.defs.get("BLOCK_M", bm)
        self.bn = self.defs.get("BLOCK_N", bn)
        self.nw = self.defs.get("NUM_WARPS", nw)
        self.smem = (self.bm + 2 * self.bn) * (hd + 8) * 2
        ck(cuda().cuFuncSetAttribute(self.fn, 8, self.smem), "set smem")  # MAX_DYNAMIC_SHARED_SIZE_BYTES

    @classmethod
    def get(cls, defs, arch):
        key = (tuple(sorted(defs.items())), arch)
        if cls.collect is not None:
            cls.collect.add(key[0])
            return None
        if key not in cls.cache:
            cls.cache[key] = Kernel(defs, arch)
        return cls.cache[key]

    def launch(self, prm, max_sq, b, h, stream=None):
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream
        arg = ctypes.pointer(prm)
        args = (ctypes.c_void_p * 1)(ctypes.cast(arg, ctypes.c_void_p))
        gx = (max_sq + self.bm - 1) // self.bm
        ck(cuda().cuLaunchKernel(self.fn, gx, b, h, 32 * self.nw, 1, 1, self.smem, ctypes.c_void_p(stream), args, None),
           "launch")


# ------------------------------------------------------------------ reference
def ref_dense(q, k, v, scale, sk_per_b, causal, window, softcap, slopes, dt):
    """q [b,sq,h,d], k/v [b,sk,hk,d] (any dtype, computed in dt). sk_per_b: list of used key counts.
    Returns o [b,sq,h,d] (dt), lse [b,h,sq] (dt)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qf = q.to(dt).permute(0, 2, 1, 3)
    kf = k.to(dt).repeat_interleave(h // hk, dim=2).permute(0, 2, 1, 3)
    vf = v.to(dt).repeat_interleave(h // hk, dim=2).permute(0, 2, 1, 3)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    dev = q.device
    i = torch.arange(sq, device=dev).view(1, 1, sq, 1)
    j = torch.arange(sk, device=dev).view(1, 1, 1, sk)
    skb = torch.tensor(sk_per_b, device=dev).view(b, 1, 1, 1)
    off = skb - sq
    if slopes is not None:
        s = s - slopes.to(dt).view(b, h, 1, 1) * (i + off - j).abs().to(dt)
    vis = j < skb
    wl, wr = window
    if causal:
        wr = 0
    if wr >= 0:
        vis = vis & (j <= i + off + wr)
    if wl >= 0:
        vis = vis & (j >= i + off - wl)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return s, lse, vf, vis


def reference(q, k, v, scale, sk_per_b, causal, window, softcap, slopes):
    s, lse, vf, vis = ref_dense(q, k, v, scale, sk_per_b, causal, window, softcap, slopes, torch.float64)
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.nan_to_num(p, nan=0.0)
    o = torch.matmul(p, vf).permute(0, 2, 1, 3)
    return o, lse


def baseline(q, k, v, scale, sk_per_b, causal, window, softcap, slopes):
    s, lse, vf, vis = ref_dense(q, k, v, scale, sk_per_b, causal, window, softcap, slopes, torch.float32)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0).to(q.dtype).float()
    o = torch.matmul(p, vf).permute(0, 2, 1, 3).to(q.dtype)
    return o


def pad_dim(d):
    for hd in (32, 64, 96, 128, 160, 192, 224, 256):
        if d <= hd:
            return hd
    raise ValueError(d)


def make_qkv(b, sq, sk, h, hk, d, dtype, aligned, qscale=1.0):
    """Random normals. aligned=True: row/head strides multiple of 8 (d padded in storage when odd)."""
    dev = "cuda"
    dst = ((d + 7) // 8) * 8 if aligned else d

    def t(bb, s, hh):
        buf = torch.randn(bb, s, hh, dst, device=dev, dtype=torch.float32).to(dtype)
        return buf[..., :d]
    q = t(b, sq, h)
    if qscale != 1.0:
        q = (q.float() * qscale).to(dtype)
        if dst != d:
            buf = torch.zeros(b, sq, h, dst, device=dev, dtype=dtype)
            buf[..., :d] = q
            q = buf[..., :d]
    return q, t(b, sk, hk), t(b, sk, hk)


class Results:
    def __init__(self, log):
        self.passed = 0
        self.failed = 0
        self.log = log

    def out(self, msg):
        print(msg, flush=True)
        self.log.write(msg + "\n")
        self.log.flush()


def fill_params(q, k, v, o, lse, d, scale, softcap, slopes, window, hk, b, sq, sk, lse_strides,
                cu_q=None, cu_k=None, seqused=None):
    P = FwdParams()
    P.q, P.k, P.v, P.o, P.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()
    if q.dim() == 4:
        P.q_batch_stride, P.q_row_stride, P.q_head_stride = q.stride(0), q.stride(1), q.stride(2)
        P.k_batch_stride, P.k_row_stride, P.k_head_stride = k.stride(0), k.stride(1), k.stride(2)
        P.v_batch_stride, P.v_row_stride, P.v_head_stride = v.stride(0), v.stride(1), v.stride(2)
        P.o_batch_stride, P.o_row_stride, P.o_head_stride = o.stride(0), o.stride(1), o.stride(2)
        h = q.shape[2]
    else:
        P.q_row_stride, P.q_head_stride = q.stride(0), q.stride(1)
        P.k_row_stride, P.k_head_stride = k.stride(0), k.stride(1)
        P.v_row_stride, P.v_head_stride = v.stride(0), v.stride(1)
        P.o_row_stride, P.o_head_stride = o.stride(0), o.stride(1)
        h = q.shape[1]
    P.lse_batch_stride, P.lse_head_stride = lse_strides
    P.b, P.h, P.hk, P.sq, P.sk, P.d = b, h, hk, sq, sk, d
    P.cu_seqlens_q = cu_q.data_ptr() if cu_q is not None else None
    P.cu_seqlens_k = cu_k.data_ptr() if cu_k is not None else None
    P.seqused_k = seqused.data_ptr() if seqused is not None else None
    P.scale = scale
    P.softcap = softcap
    P.alibi_slopes = slopes.data_ptr() if slopes is not None else None
    P.alibi_batch_stride = h if slopes is not None else 0
    P.window_left, P.window_right = window
    return P


def check(R, name, o, lse, ref_o, ref_lse, base_o, factor, empty):
    of = o.double()
    if torch.isnan(of).any():
        R.failed += 1
        R.out(f"FAIL {name}: NaN in o ({int(torch.isnan(of).sum())})")
        return
    err = (of - ref_o).abs().max().item()
    berr = (base_o.double() - ref_o).abs().max().item()
    tol = factor * berr + 1e-5
    lse_ok = True
    lmsg = ""
    if torch.isnan(lse).any():
        lse_ok = False
        lmsg = "NaN lse"
    else:
        fin = torch.isfinite(ref_lse)
        if not torch.equal(torch.isfinite(lse), fin) or not bool((lse[~fin] == float("-inf")).all()):
            lse_ok = False
            lmsg = "lse -inf pattern"
        elif fin.any():
            le = (lse.double()[fin] - ref_lse[fin]).abs().max().item()
            lmsg = f"lse_err={le:.2e}"
            lse_ok = le <= 1e-3
    ok = err <= tol and lse_ok
    if ok:
        R.passed += 1
    else:
        R.failed += 1
    R.out(f"{'ok  ' if ok else 'FAIL'} {name}: err={err:.2e} tol={tol:.2e} (base {berr:.2e}) {lmsg} empty_rows={empty}")


def run_dense(R, arch, dtype, d, b, sq, sk, h, hk, causal=False, window=(-1, -1), alibi=False, softcap=0.0,
              seqused=False, aligned=True, determinism=False):
    hd = pad_dim(d)
    has_mask = causal or window != (-1, -1)
    win = (window[0], 0) if causal else window
    defs = {"HEAD_DIM": hd, "IS_BF16": int(dtype == torch.bfloat16), "HAS_MASK": int(has_mask),
            "HAS_ALIBI": int(alibi), "HAS_SOFTCAP": int(softcap > 0), "IS_VARLEN": 0, "ALIGNED16": int(aligned)}
    kern = Kernel.get(defs, arch)
    if kern is None:
        return
    q, k, v = make_qkv(b, sq, sk, h, hk, d, dtype, aligned, qscale=(8.0 if softcap > 0 else 1.0))
    o = torch.full((b, sq, h, ((d + 7) // 8) * 8 if aligned else d), float("nan"), device="cuda", dtype=dtype)[..., :d]
    lse = torch.full((b, h, sq), float("nan"), device="cuda", dtype=torch.float32)
    slopes = (torch.rand(b, h, device="cuda") * 0.3).float().contiguous() if alibi else None
    sk_per_b = [sk] * b
    su = None
    if seqused:
        sk_per_b = [random.randint(0, sk) for _ in range(b)]
        su = torch.tensor(sk_per_b, device="cuda", dtype=torch.int32)
    scale = 1.0 / math.sqrt(d)
    P = fill_params(q, k, v, o, lse, d, scale, softcap, slopes, win, hk, b, sq, sk, (lse.stride(0), lse.stride(1)),
                    seqused=su)
    kern.launch(P, sq, b, h)
    torch.cuda.synchronize()
    ref_o, ref_lse = reference(q, k, v, scale, sk_per_b, causal, win, softcap, slopes)
    base_o = baseline(q, k, v, scale, sk_per_b, causal, win, softcap, slopes)
    empty = int((~torch.isfinite(ref_lse)).sum())
    name = (f"{str(dtype)[6:]} d={d} b={b} sq={sq} sk={sk} h={h}/{hk} causal={int(causal)} win={window} "
            f"alibi={int(alibi)} softcap={softcap} seqused={int(seqused)} aligned={int(aligned)}")
    check(R, name, o, lse, ref_o, ref_lse.permute(0, 1, 2), base_o, 3 if (alibi or softcap > 0) else 2, empty)
    if determinism:
        o2 = torch.full((b, sq, h, o.stride(2)), float("nan"), device="cuda", dtype=dtype)[..., :d]
        lse2 = torch.full_like(lse, float("nan"))
        P2 = fill_params(q, k, v, o2, lse2, d, scale, softcap, slopes, win, hk, b, sq, sk,
                         (lse.stride(0), lse.stride(1)), seqused=su)
        kern.launch(P2, sq, b, h)
        torch.cuda.synchronize()
        same = torch.equal(o.contiguous().view(torch.int16), o2.contiguous().view(torch.int16)) and torch.equal(lse.view(torch.int32),
                                                                                     lse2.view(torch.int32))
        if same:
            R.passed += 1
        else:
            R.failed += 1
        R.out(f"{'ok  ' if same else 'FAIL'} determinism {name}")


def run_varlen(R, arch, dtype, d, b, max_sq, max_sk, h, hk, causal=False, window=(-1, -1), alibi=False,
               softcap=0.0, seqused=False):
    hd = pad_dim(d)
    has_mask = causal or window != (-1, -1)
    win = (window[0], 0) if causal else window
    defs = {"HEAD_DIM": hd, "IS_BF16": int(dtype == torch.bfloat16), "HAS_MASK": int(has_mask),
            "HAS_ALIBI": int(alibi), "HAS_SOFTCAP": int(softcap > 0), "IS_VARLEN": 1, "ALIGNED16": 1}
    kern = Kernel.get(defs, arch)
    if kern is None:
        return
    lq = [random.randint(1, max_sq) for _ in range(b)]
    lk = [random.randint(1, max_sk) for _ in range(b)]
    if b > 2:
        lk[1] = 0  # a sequence with no keys at all
    tq, tk = sum(lq), sum(lk)
    dst = ((d + 7) // 8) * 8
    qb = torch.randn(tq, h, dst, device="cuda").to(dtype)
    kb = torch.randn(tk, hk, dst, device="cuda").to(dtype)
    vb = torch.randn(tk, hk, dst, device="cuda").to(dtype)
    q, k, v = qb[..., :d], kb[..., :d], vb[..., :d]
    o = torch.full((tq, h, dst), float("nan"), device="cuda", dtype=dtype)[..., :d]
    lse = torch.full((h, tq), float("nan"), device="cuda", dtype=torch.float32)
    cq = [0]
    ckk = [0]
    for a, c in zip(lq, lk):
        cq.append(cq[-1] + a)
        ckk.append(ckk[-1] + c)
    cu_q = torch.tensor(cq, device="cuda", dtype=torch.int32)
    cu_k = torch.tensor(ckk, device="cuda", dtype=torch.int32)
    used = [random.randint(0, x) for x in lk] if seqused else list(lk)
    su = torch.tensor(used, device="cuda", dtype=torch.int32) if seqused else None
    slopes = (torch.rand(b, h, device="cuda") * 0.3).float().contiguous() if alibi else None
    scale = 1.0 / math.sqrt(d)
    P = fill_params(q, k, v, o, lse, d, scale, softcap, slopes, win, hk, b, max(lq), max(lk), (0, lse.stride(0)),
                    cu_q=cu_q, cu_k=cu_k, seqused=su)
    kern.launch(P, max(lq), b, h)
    torch.cuda.synchronize()
    worst = None
    for i in range(b):
        qs = q[cq[i]:cq[i + 1]].unsqueeze(0)
        ks = k[ckk[i]:ckk[i + 1]].unsqueeze(0)
        vs = v[ckk[i]:ckk[i + 1]].unsqueeze(0)
        sl = slopes[i:i + 1] if alibi else None
        ro, rl = reference(qs, ks, vs, scale, [used[i]], causal, win, softcap, sl)
        bo = baseline(qs, ks, vs, scale, [used[i]], causal, win, softcap, sl)
        oo = o[cq[i]:cq[i + 1]].unsqueeze(0)
        ll = lse[:, cq[i]:cq[i + 1]].unsqueeze(0)
        sub = Results(R.log)
        sub.out = lambda m: None
        check(sub, "", oo, ll, ro, rl, bo, 3 if (alibi or softcap > 0) else 2, 0)
        if sub.failed:
            worst = i
            break
    name = (f"varlen {str(dtype)[6:]} d={d} b={b} lq={lq} lk={lk} used={used} h={h}/{hk} causal={int(causal)} "
            f"win={window} alibi={int(alibi)} softcap={softcap}")
    if worst is None:
        R.passed += 1
        R.out(f"ok   {name}")
    else:
        R.failed += 1
        R.out(f"FAIL {name}: sequence {worst}")
        check(R, f"  seq {worst}", o[cq[worst]:cq[worst + 1]].unsqueeze(0),
              lse[:, cq[worst]:cq[worst + 1]].unsqueeze(0), *reference(
                  q[cq[worst]:cq[worst + 1]].unsqueeze(0), k[ckk[worst]:ckk[worst + 1]].unsqueeze(0),
                  v[ckk[worst]:ckk[worst + 1]].unsqueeze(0), scale, [used[worst]], causal, win, softcap,
                  slopes[worst:worst + 1] if alibi else None),
              baseline(q[cq[worst]:cq[worst + 1]].unsqueeze(0), k[ckk[worst]:ckk[worst + 1]].unsqueeze(0),
                       v[ckk[worst]:ckk[worst + 1]].unsqueeze(0), scale, [used[worst]], causal, win, softcap,
                       slopes[worst:worst + 1] if alibi else None), 2, 0)
        R.failed -= 1


def safe(R, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception:  # noqa: BLE001
        import traceback
        R.failed += 1
        R.out(f"FAIL exception in {fn.__name__}{args[1:]} {kw}: {traceback.format_exc()}")


def correctness(R, arch, quick):
    SHAPES = [(113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024), (1024, 1023),
              (1, 147), (3, 799), (127, 513), (239, 1), (799, 3)]
    DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
    heads = [(6, 6), (6, 2), (6, 1)]
    random.seed(0)
    torch.manual_seed(0)
    cases = 0
    for dt in (torch.float16, torch.bfloat16):
        for d in DIMS:
            shapes = SHAPES if d in (64, 128, 256) and not quick else random.sample(SHAPES, 3)
            for (sq, sk) in shapes:
                h, hk = random.choice(heads)
                b = 2 if sq * sk > 300000 else 3
                safe(R, run_dense, R, arch, dt, d, b, sq, sk, h, hk, causal=False)
                safe(R, run_dense, R, arch, dt, d, b, sq, sk, h, hk, causal=True)
                cases += 2
            # random window
            sq, sk = random.choice(SHAPES)
            safe(R, run_dense, R, arch, dt, d, 2, sq, sk, 6, 2, window=(random.randint(0, 300), random.randint(0, 300)))
            safe(R, run_dense, R, arch, dt, d, 2, 300, 200, 6, 2, window=(random.randint(0, 64), -1))
            safe(R, run_dense, R, arch, dt, d, 2, 200, 300, 6, 3, window=(-1, random.randint(0, 64)))
    # features, fewer dims
    for dt in (torch.float16, torch.bfloat16):
        for d in (64, 111, 128, 256):
            safe(R, run_dense, R, arch, dt, d, 2, 200, 333, 6, 2, alibi=True)
            safe(R, run_dense, R, arch, dt, d, 2, 333, 200, 6, 2, alibi=True, causal=True)
            safe(R, run_dense, R, arch, dt, d, 2, 257, 513, 6, 6, softcap=50.0)
            safe(R, run_dense, R, arch, dt, d, 2, 257, 513, 6, 1, softcap=50.0, causal=True, alibi=True)
            safe(R, run_dense, R, arch, dt, d, 3, 200, 400, 6, 2, seqused=True, causal=True)
            safe(R, run_varlen, R, arch, dt, d, 4, 300, 300, 6, 2)
            safe(R, run_varlen, R, arch, dt, d, 4, 300, 300, 6, 2, causal=True)
            safe(R, run_varlen, R, arch, dt, d, 4, 200, 400, 6, 1, window=(50, 20), alibi=True, softcap=30.0, seqused=True)
        # unaligned layouts (odd d, contiguous storage)
        for d in (59, 111):
            safe(R, run_dense, R, arch, dt, d, 2, 113, 203, 6, 2, aligned=False)
            safe(R, run_dense, R, arch, dt, d, 2, 203, 113, 6, 2, aligned=False, causal=True)
    # determinism and stress: seqlens 1..17, logits scaled by 100
    for d in (64, 128):
        safe(R, run_dense, R, arch, torch.bfloat16, d, 2, 1024, 1024, 6, 2, causal=True, determinism=True)
    for s in range(1, 18, 4):
        for d in (32, 128):
            safe(R, run_dense, R, arch, torch.float16, d, 2, s, s + 3, 6, 2, causal=True)
            safe(R, run_dense, R, arch, torch.float16, d, 2, s + 3, s, 6, 2, causal=True)
    for dt in (torch.float16, torch.bfloat16):
        q, k, v = make_qkv(2, 64, 64, 4, 4, 64, dt, True, qscale=100.0)
        kern = Kernel.get({"HEAD_DIM": 64, "IS_BF16": int(dt == torch.bfloat16), "HAS_MASK": 0, "HAS_ALIBI": 0,
                           "HAS_SOFTCAP": 0, "IS_VARLEN": 0, "ALIGNED16": 1}, arch)
        if kern is None:
            continue
        o = torch.full((2, 64, 4, 64), float("nan"), device="cuda", dtype=dt)
        lse = torch.full((2, 4, 64), float("nan"), device="cuda")
        k = (k.float() * 100).to(dt)
        P = fill_params(q, k, v, o, lse, 64, 0.125, 0.0, None, (-1, -1), 4, 2, 64, 64, (lse.stride(0), lse.stride(1)))
        kern.launch(P, 64, 2, 4)
        torch.cuda.synchronize()
        bad = bool(torch.isnan(o).any() or torch.isinf(o).any() or torch.isnan(lse).any())
        R.passed += int(not bad)
        R.failed += int(bad)
        R.out(f"{'FAIL' if bad else 'ok  '} stress logits x100 {dt}")


BENCH_TILES = {64: [(128, 128, 4), (128, 64, 4), (64, 128, 4)],
               128: [(128, 64, 4), (128, 32, 4), (64, 64, 4), (128, 64, 8)],
               256: [(128, 64, 8), (64, 64, 4), (128, 32, 8)]}


def bench_defs(d, c, tile):
    defs = {"HEAD_DIM": d, "IS_BF16": 1, "HAS_MASK": c, "HAS_ALIBI": 0, "HAS_SOFTCAP": 0, "IS_VARLEN": 0,
            "ALIGNED16": 1}
    if tile != TILE_DEFAULTS[d]:
        defs.update({"BLOCK_M": tile[0], "BLOCK_N": tile[1], "NUM_WARPS": tile[2]})
    return defs


def bench(R, arch, iters=10, seqs=(1024, 2048, 4096, 8192, 16384), tune_seqs=(4096, 16384)):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    R.out("\nbenchmark (bf16, 16k tokens, TFLOP/s = 4*b*h*s*s*d / t, halved causal); tiles BMxBNxWARPS")
    R.out(f"{'d':>4} {'causal':>6} {'s':>6} {'b':>3} {'h':>3} {'tile':>10} {'ours':>8} {'sdpa-fa2':>9} {'ratio':>6}")

    def timeit(fn):
        try:
            for _ in range(3):
                fn()
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            for _ in range(iters):
                fn()
            en.record()
            torch.cuda.synchronize()
            return st.elapsed_time(en) / iters * 1e-3
        except Exception as e:  # noqa: BLE001
            R.out(f"  bench error: {e}")
            return float("nan")

    for d in (64, 128, 256):
        for c in (0, 1):
            for s in seqs:
                b, h = 16384 // s, 2048 // d
                q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
                o = torch.empty_like(q)
                lse = torch.empty(b, h, s, device="cuda")
                P = fill_params(q, k, v, o, lse, d, d ** -0.5, 0.0, None, (-1, 0) if c else (-1, -1), h, b, s, s,
                                (lse.stride(0), lse.stride(1)))
                flops = 4 * b * h * s * s * d / (2 if c else 1)
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

                def theirs():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        F.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(c))
                tt = flops / timeit(theirs) / 1e12
                tiles = BENCH_TILES[d] if s in tune_seqs else [TILE_DEFAULTS[d]]
                for tile in tiles:
                    kern = Kernel.get(bench_defs(d, c, tile), arch)
                    to = flops / timeit(lambda: kern.launch(P, s, b, h)) / 1e12
                    ts = "x".join(map(str, tile))
                    R.out(f"{d:>4} {c:>6} {s:>6} {b:>3} {h:>3} {ts:>10} {to:>8.1f} {tt:>9.1f} {to / tt:>6.2f}")
                del q, k, v, o, lse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_ctx()
    cc = torch.cuda.get_device_capability()
    arch = a.arch or f"sm_{cc[0]}{cc[1]}"
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "kernel_probe.log"), "w")
    R = Results(log)
    R.out(f"device: {torch.cuda.get_device_name()} arch={arch} torch={torch.__version__}")
    t0 = time.time()
    Kernel.collect = set()
    if not a.no_check:
        correctness(R, arch, a.quick)
    if a.bench:
        for d in (64, 128, 256):
            for c in (0, 1):
                for tile in BENCH_TILES[d]:
                    Kernel.collect.add(tuple(sorted(bench_defs(d, c, tile).items())))
    keys = sorted(Kernel.collect)
    Kernel.collect = None
    Kernel.precompile(keys, arch)
    R.out(f"compiled {len(keys)} variants in {time.time() - t0:.0f}s")
    bad = [k for k in keys if not Kernel.compiled[(k, arch)][0]]
    for k in bad:
        R.out(f"COMPILE FAIL {dict(k)}\n{Kernel.compiled[(k, arch)][1]}")
    if not a.no_check:
        try:
            correctness(R, arch, a.quick)
        except Exception as e:  # noqa: BLE001
            import traceback
            R.out("EXCEPTION " + traceback.format_exc())
            R.failed += 1
        R.out(f"\ncorrectness: {R.passed} passed, {R.failed} failed ({time.time() - t0:.0f}s)")
    for key, k in Kernel.cache.items():
        for (_n, regs, ss, sl, _smem) in k.usage:
            R.out(f"  variant {dict(key[0])}: regs={regs} spills={ss}/{sl} compile={k.compile_s:.1f}s")
    if a.bench:
        bench(R, arch)
    log.close()
    sys.exit(1 if R.failed else 0)


if __name__ == "__main__":
    main()
