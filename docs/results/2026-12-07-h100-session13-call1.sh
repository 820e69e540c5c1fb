#!/usr/bin/env bash
# Session 13 call 1. (1) In parallel: branch fp8-fwd's accuracy probe (SM90_FP8_PROMOTE = 0 / 1 / 2: S accumulated
# across all k32 steps, none, or pairs, per head dim, causal and not) and its quick FP8 sweep; main's full CUDA
# sweeps bf16 and f16 (the d 64 dQ tensor path). (2) Issue 16: the package and the CLI alternating point by point,
# five rounds, seqlen 1k-16k. (3) e4m3 against bf16 forward (branch, standard grid) and the promoted variants' cost.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=/tmp/w; mkdir -p $W
export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_REQUIRE_GPU=1
S=$(date +%s)
T() { echo "$1 t=$(( $(date +%s)-S ))" >> "$OUT/summary.txt"; }
snap() { tar czf "$OUT/r$1.tgz" -C $W . ; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT/summary.txt"
F=$G/fp8
for d in 64 128 256; do
  (for g in 0 1 2; do for c in "" "--causal"; do
     o=""; [ $g != 0 ] && o="--nvrtc-option=-DSM90_FP8_PROMOTE=$g"
     echo "== d $d G $g $c" ; timeout 40 "$F/flashattn" check --device cuda --dtype e4m3 -d $d -b 2 -s 300 --seqlen-k 517 --heads 8 --heads-k 2 $c $o 2>&1 | grep -E "lse|o  |PASS|FAIL|error" | head -4
   done; done > $W/fp8check_d$d.txt 2>&1) &
done
(FLASHATTN_SWEEP=quick timeout 100 "$F/cuda" --exact fp8_sweep --nocapture --test-threads=1 > $W/t_fp8q.log 2>&1; echo "rc=$?" >> $W/t_fp8q.log) &
(FLASHATTN_SWEEP=full timeout 230 "$G/cuda" --exact sweep_bf16 --test-threads=1 > $W/t_bf16.log 2>&1; echo "rc=$?" >> $W/t_bf16.log) &
(FLASHATTN_SWEEP=full timeout 230 "$G/cuda" --exact sweep_f16 --test-threads=1 > $W/t_f16.log 2>&1; echo "rc=$?" >> $W/t_f16.log) &
wait; T phase1
grep -hE "test result|rc=|cuda fp8|SKIP|cuda sweep|panicked" $W/t_*.log | cut -c1-300 >> "$OUT/summary.txt"
cat $W/fp8check_d*.txt >> "$OUT/summary.txt"
snap 1
mkdir -p $W/il
OUT="$W/il" INTERLEAVED_SEQLENS=1024,2048,4096,8192,16384 timeout 330 bash "$G/python.sh" interleaved > /dev/null 2>&1; T "interleaved rc=$?"
tail -3 $W/il/summary.txt >> "$OUT/summary.txt"
snap 2
timeout 60 "$F/flashattn" bench --device cuda --grid standard --dtype e4m3 --modes fwd --json $W/fp8_e4m3.json > $W/fp8_bench.txt 2>&1
timeout 60 "$F/flashattn" bench --device cuda --grid standard --dtype bf16 --modes fwd --json $W/fp8_bf16.json >> $W/fp8_bench.txt 2>&1
for g in 1 2; do timeout 40 "$F/flashattn" bench --device cuda --grid standard --dims 128,256 --seqlens 4096,16384 --dtype e4m3 --modes fwd --nvrtc-option=-DSM90_FP8_PROMOTE=$g --json $W/fp8_g$g.json >> $W/fp8_bench.txt 2>&1; done
T fp8bench; snap 3
