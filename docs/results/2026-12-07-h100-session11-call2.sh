#!/usr/bin/env bash
# Session 11 call 2: the sm90 backward with dQ through shared memory + bulk reduce-adds (DQ_BULK): Rust CUDA tests
# (quick sweep), A/B against -DBWD90_DQ_BULK=0 (same binary), ncu L2 counters of both, racecheck/memcheck.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels FLASHATTN_ALLOW_SPILLS=1
S=$(date +%s)
T() { echo "$1 t=$(( $(date +%s)-S ))" >> "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT/summary.txt"
FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick timeout 220 "$G/cuda" --test-threads=1 > "$OUT/rust_cuda.log" 2>&1; T "cuda rc=$?"
grep -E "test result|passed|FAILED|panicked|cases" "$OUT/rust_cuda.log" | cut -c1-250 >> "$OUT/summary.txt"
OFF=--nvrtc-option=-DBWD90_DQ_BULK=0
B() { timeout 80 "$G/flashattn" bench --grid standard --dims 64,128 --modes fwd_bwd "$@"; }
B --json "$OUT/ab_new1.json" > /dev/null 2>&1; T new1
B $OFF --json "$OUT/ab_old1.json" > /dev/null 2>&1; T old1
B $OFF --json "$OUT/ab_old2.json" > /dev/null 2>&1; T old2
B --json "$OUT/ab_new2.json" > /dev/null 2>&1; T new2
M=gpu__time_duration.sum,lts__t_requests_op_red.sum,lts__t_sectors_op_red.sum,lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum,lts__t_sectors.sum,lts__t_sectors.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed_op_global_red.sum,smsp__inst_executed.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
for v in new old; do
  timeout 60 ncu --metrics $M -k regex:flash_bwd_sm90 --launch-skip 2 --launch-count 1 \
    "$G/flashattn" bench --device cuda --shape 4,16,4096,128 --modes fwd_bwd --warmup 2 --reps 2 --causal 0 $([ $v = old ] && echo $OFF) > "$OUT/ncu_$v.txt" 2>&1
done
T ncu
for d in 64 128; do
  timeout 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d $d -b 1 -s 300 --heads 2 --causal --backward > "$OUT/race_$d.txt" 2>&1; T "racecheck d$d rc=$?"
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d $d -b 2 -s 300 --heads 2 --backward > "$OUT/mem_$d.txt" 2>&1; T "memcheck d$d rc=$?"
done
python3 "$G/pkg_vs_cli.py" --help > /dev/null 2>&1
