#!/usr/bin/env python3
"""Compile a CUDA source with NVRTC (no GPU needed) and report registers / spills.

Usage:
  tools/nvrtc_compile.py crates/flashattn/kernels/fwd.cu --arch sm_80 -D HEAD_DIM=128 -D IS_BF16=1 [--no-spills]
  tools/nvrtc_compile.py FILE --arch sm_90a --matrix fwd     # every forward variant (see FWD_MATRIX below)

libnvrtc is looked up in $NVRTC_LIB_DIR, then next to the `nvidia-cuda-nvrtc` pip package of the running
Python, then the usual CUDA install paths, then the loader's default search.
Exit status: 1 on a compile error, 2 when --no-spills is given and a kernel spills. A kernel whose wgmma
instructions ptxas serialised is flagged WGMMA-SERIALIZED.
"""
import argparse
import ctypes
import glob
import itertools
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "crates", "flashattn", "kernels")


def find_nvrtc():
    cands = []
    env = os.environ.get("NVRTC_LIB_DIR")
    if env:
        cands += sorted(glob.glob(os.path.join(env, "libnvrtc.so*")))
    try:
        import nvidia  # type: ignore
        for p in list(nvidia.__path__):
            cands += sorted(glob.glob(os.path.join(p, "cu13", "lib", "libnvrtc.so*")))
            cands += sorted(glob.glob(os.path.join(p, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for base in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
        cands += sorted(glob.glob(os.path.join(base, "libnvrtc.so*")))
    cands = [c for c in cands if "builtins" not in c and ".alt." not in c]
    cands.append("libnvrtc.so")
    for c in cands:
        try:
            # libnvrtc dlopens its builtins library by soname: load it from the same folder first.
            for b in sorted(glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so*"))):
                if ".alt." not in b:
                    try:
                        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                    except OSError:
                        pass
            return ctypes.CDLL(c, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    sys.exit("libnvrtc not found: set NVRTC_LIB_DIR")


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = find_nvrtc()
    return _lib


def compile_source(src, name, opts, want_cubin=True):
    """Returns (ok, log, binary)."""
    L = lib()
    prog = ctypes.c_void_p()
    r = L.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    if r != 0:
        raise RuntimeError(f"nvrtcCreateProgram: {r}")
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    r = L.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    L.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    L.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace")
    binary = None
    if r == 0:
        if want_cubin:
            L.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            b = ctypes.create_string_buffer(n.value)
            L.nvrtcGetCUBIN(prog, b)
        else:
            L.nvrtcGetPTXSize(prog, ctypes.byref(n))
            b = ctypes.create_string_buffer(n.value)
            L.nvrtcGetPTX(prog, b)
        binary = b.raw
    L.nvrtcDestroyProgram(ctypes.byref(prog))
    return r == 0, log, binary


def parse_usage(log):
    """[(kernel, regs, spill_stores, spill_loads, smem)] from a ptxas -v log."""
    out = []
    cur = None
    in_kernel = True
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = [m.group(1), None, 0, 0, 0]
            out.append(cur)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            # a non-inlined device function's properties follow its caller's: not the kernel's
            in_kernel = cur is not None and m.group(1) == cur[0]
            continue
        if cur is None or not in_kernel:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur[2], cur[3] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur[1] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur[4] = int(m.group(1))
    return out


def build_opts(arch, defines, incs, extra):
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v", "-default-device"]
    opts += [f"-I{i}" for i in incs]
    opts += [f"-D{d}" for d in defines]
    opts += extra
    return opts


# Forward variants compiled by --matrix fwd: every head dim x dtype x mask x (alibi, softcap, varlen).
FWD_HEAD_DIMS = [32, 64, 96, 128, 160, 192, 224, 256]


def fwd_matrix(full):
    feats = list(itertools.product([0, 1], repeat=4)) if full else [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1)]
    for hd in FWD_HEAD_DIMS:
        for bf in (0, 1):
            for (mask, alibi, softcap, varlen) in feats:
                for al in (1, 0):
                    if al == 0 and (mask, alibi, softcap, varlen) != (0, 0, 0, 0) and (mask, alibi, softcap, varlen) != (1, 0, 0, 0):
                        continue
                    yield [f"HEAD_DIM={hd}", f"IS_BF16={bf}", f"HAS_MASK={mask}", f"HAS_ALIBI={alibi}",
                           f"HAS_SOFTCAP={softcap}", f"IS_VARLEN={varlen}", f"ALIGNED16={al}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--arch", action="append", default=None, help="sm_80, sm_90a, ... (repeatable)")
    ap.add_argument("-D", action="append", default=[], dest="defines")
    ap.add_argument("-I", action="append", default=[], dest="incs")
    ap.add_argument("--no-spills", action="store_true")
    ap.add_argument("--matrix", choices=["fwd", "fwd-full"], default=None)
    ap.add_argument("--ptx", action="store_true", help="emit PTX instead of a cubin")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--quiet", action="store_true", help="print only the usage summary")
    ap.add_argument("--opt", action="append", default=[], help="extra raw NVRTC option")
    a = ap.parse_args()
    archs = a.arch or ["sm_80"]
    incs = a.incs or [os.path.relpath(KERNELS)]
    src = open(a.file).read()
    name = os.path.basename(a.file)
    combos = [a.defines] if a.matrix is None else [c + a.defines for c in fwd_matrix(a.matrix == "fwd-full")]
    bad = 0
    spilled = 0
    for arch in archs:
        for defs in combos:
            t0 = time.time()
            ok, log, binary = compile_source(src, name, build_opts(arch, defs, incs, a.opt), not a.ptx)
            dt = time.time() - t0
            tag = f"{arch} {' '.join(defs)}"
            if not ok:
                bad += 1
                print(f"FAIL {tag}\n{log}")
                continue
            use = parse_usage(log)
            if not a.quiet and a.matrix is None:
                print(log.strip())
            # ptxas's note that it serialised the wgmma instructions (C7515 and kin): no overlap left.
            wgmma_serial = "wgmma.mma_async instructions are serialized" in log
            for k, regs, ss, sl, smem in use:
                flag = "" if ss == 0 and sl == 0 else "  SPILLS"
                if flag:
                    spilled += 1
                if wgmma_serial:
                    flag += "  WGMMA-SERIALIZED"
                print(f"ok  {tag}: {k} regs={regs} spill_st={ss} spill_ld={sl} smem={smem} ({dt:.1f}s){flag}")
            if a.output and binary is not None:
                open(a.output, "wb").write(binary)
    if bad:
        print(f"{bad} compile failure(s)")
        sys.exit(1)
    if spilled and a.no_spills:
        print(f"{spilled} kernel(s) spill")
        sys.exit(2)


if __name__ == "__main__":
    main()
