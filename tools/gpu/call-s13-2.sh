#!/usr/bin/env bash
# Session 13 call 2. (1) Issue 16's correctness on main's head: `python.sh correct` (pytest on CUDA tensors with
# the Rust CUDA tests beside it, then memcheck on a reduced pytest run); beside it, branch fp8-fwd's FP8 sweep
# (quick with SM90_FP8_PROMOTE = 0, 1, 2; medium with 1). (2) Issue 16's speed: the package and the CLI
# alternating point by point, forward+backward, three rounds, seqlen 1k-16k.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=/tmp/w; mkdir -p $W/c
export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels FLASHATTN_REQUIRE_GPU=1
S=$(date +%s)
T() { echo "$1 t=$(( $(date +%s)-S ))" >> "$OUT/summary.txt"; }
snap() { tar czf "$OUT/r$1.tgz" -C $W . ; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT/summary.txt"
(OUT=$W/c timeout 430 bash "$G/python.sh" correct > /dev/null 2>&1; echo "correct rc=$?" >> $W/c/rc.txt) &
(for g in 0 1 2; do FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_SWEEP=quick FLASHATTN_TEST_NVRTC_OPTIONS="-DSM90_FP8_PROMOTE=$g" \
   timeout 100 "$G/fp8/cuda" --exact fp8_sweep --nocapture --test-threads=1 > $W/fp8q_g$g.log 2>&1; echo "rc=$?" >> $W/fp8q_g$g.log; done
 FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_SWEEP=medium FLASHATTN_TEST_NVRTC_OPTIONS="-DSM90_FP8_PROMOTE=1" \
   timeout 100 "$G/fp8/cuda" --exact fp8_sweep --nocapture --test-threads=1 > $W/fp8m_g1.log 2>&1; echo "rc=$?" >> $W/fp8m_g1.log) &
wait; T phase1
cat $W/c/rc.txt >> "$OUT/summary.txt"; cat $W/c/summary.txt >> "$OUT/summary.txt" 2>/dev/null
for f in $W/fp8*.log; do echo "== $f"; grep -E "cuda fp8 sweep|SKIP|unsupported|rc=" $f | cut -c1-400 | head -5; done >> "$OUT/summary.txt"
snap 1
PYTHONPATH=/tmp/site timeout 300 python3 "$G/pkg_cli_interleaved.py" --cli "$G/flashattn" --rounds 3 --modes fwd_bwd \
    --seqlens 1024,2048,4096,8192,16384 --json $W/il_fb.json > $W/il_fb.txt 2>&1; T "interleaved fwd_bwd rc=$?"
tail -1 $W/il_fb.txt >> "$OUT/summary.txt"
snap 2
