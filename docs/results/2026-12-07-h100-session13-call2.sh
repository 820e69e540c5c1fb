#!/usr/bin/env bash
# Session 13 call 2 (little device time left). (1) Issue 16's correctness on main's head: `python.sh pytest memcheck`
# (the whole pytest suite on CUDA tensors, then memcheck on the reduced run); beside it, branch fp8-fwd's quick FP8
# sweep with SM90_FP8_PROMOTE=1. (2) Issue 16's speed: the package and the CLI alternating point by point,
# forward+backward, three rounds, seqlen 1k-16k (its lines straight into $OUT: the call may end at the budget).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=/tmp/w; mkdir -p $W/c
export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels FLASHATTN_REQUIRE_GPU=1
S=$(date +%s)
T() { echo "$1 t=$(( $(date +%s)-S ))" >> "$OUT/summary.txt"; }
snap() { tar czf "$OUT/r$1.tgz" -C $W . ; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT/summary.txt"
(OUT=$W/c timeout 270 bash "$G/python.sh" pytest memcheck > /dev/null 2>&1; echo "pytest+memcheck rc=$?" >> $W/c/rc.txt) &
(FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_SWEEP=quick FLASHATTN_TEST_NVRTC_OPTIONS="-DSM90_FP8_PROMOTE=1" \
   timeout 100 "$G/fp8/cuda" --exact fp8_sweep --nocapture --test-threads=1 > $W/fp8q_g1.log 2>&1; echo "rc=$?" >> $W/fp8q_g1.log) &
wait; T phase1
cat $W/c/rc.txt $W/c/summary.txt >> "$OUT/summary.txt" 2>/dev/null
grep -E "cuda fp8 sweep|SKIP|rc=" $W/fp8q_g1.log | cut -c1-300 >> "$OUT/summary.txt"
snap 1
PYTHONPATH=/tmp/site timeout 170 python3 "$G/pkg_cli_interleaved.py" --cli "$G/flashattn" --rounds 3 --modes fwd_bwd \
    --seqlens 1024,2048,4096,8192,16384 --json $W/il_fb.json > "$OUT/il_fb.txt" 2>&1; T "interleaved fwd_bwd rc=$?"
snap 2
