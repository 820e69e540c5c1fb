#!/usr/bin/env bash
# Session 9's last device call: correctness of main (pytest on CUDA, the sink tests) and of branch twopass (its
# quick sweep, its sink tests) side by side, the two f16 near-bound failures of call A re-run with their seeds on
# main's and the base's binaries, then the backward A/B (branch against main) and the sink benchmarks of both.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
export AB_BRANCH=twopass
(
  export FLASHATTN_REQUIRE_GPU=1 FLASHATTN_ALLOW_SPILLS=1
  FLASHATTN_CACHE_DIR=/tmp/fk-branch FLASHATTN_SWEEP=quick timeout 330 "$G/twopass/cuda" --test-threads=1 sweep \
      > "$OUT/branch_sweep.log" 2>&1; echo "twopass sweep rc=$?" >> "$OUT/branch_sweep.log"
) &
(
  export FLASHATTN_REQUIRE_GPU=1 FLASHATTN_ALLOW_SPILLS=1
  FLASHATTN_CACHE_DIR=/tmp/fk-main timeout 200 "$G/cuda_sink" --test-threads=1 > "$OUT/sink_tests.log" 2>&1
  echo "main cuda_sink rc=$?" >> "$OUT/sink_tests.log"
  FLASHATTN_CACHE_DIR=/tmp/fk-branch timeout 200 "$G/twopass/cuda_sink" --test-threads=1 >> "$OUT/sink_tests.log" 2>&1
  echo "twopass cuda_sink rc=$?" >> "$OUT/sink_tests.log"
  for b in "$G/cuda_sink" "$G/base/cuda_sink"; do
    FLASHATTN_CACHE_DIR=/tmp/fk-repro FLASHATTN_SEED=6144743037120594416 timeout 60 "$b" sink_f16_sm80_backward \
        --test-threads=1 > "$OUT/repro_tmp.log" 2>&1; echo "$b rc=$?" >> "$OUT/repro_tmp.log"
    grep -E "FAIL Case|passed|rc=" "$OUT/repro_tmp.log" | cut -c1-400 >> "$OUT/repro.log"
  done
  for b in "$G/cuda" "$G/base/cuda"; do
    FLASHATTN_CACHE_DIR=/tmp/fk-repro FLASHATTN_SEED=12260128550155768860 FLASHATTN_SWEEP=quick timeout 90 "$b" \
        sweep_f16 --test-threads=1 > "$OUT/repro_tmp.log" 2>&1; echo "$b rc=$?" >> "$OUT/repro_tmp.log"
    grep -E "FAIL Case|passed|rc=" "$OUT/repro_tmp.log" | cut -c1-400 >> "$OUT/repro.log"
  done
) &
bash "$G/python.sh" pytest
wait
grep -E "test result|rc=|passed, |FAIL" "$OUT/branch_sweep.log" "$OUT/sink_tests.log" | cut -c1-300 >> "$OUT/summary.txt"
cat "$OUT/repro.log" >> "$OUT/summary.txt"
BWD_BASE=twopass BWD_PEERS= bash "$G/python.sh" bwdab sinkbench branchsinkbench
rm -f "$OUT/repro_tmp.log"
# Last, and cut first if time runs out: the decode point short of FA2 by split count, both cache layouts
# (token-major is the package's), then ncu of the sm90 backward with and without a sink.
for n in 0 4 8 16 32; do
  timeout 60 "$G/flashattn" bench --grid decode --seqlens 128k --batch 8 --num-splits "$n" --warmup 10 --reps 60 \
      2>&1 | tail -2 | sed "s/^/splits=$n /" >> "$OUT/gap2.txt"
done
cat "$OUT/gap2.txt" >> "$OUT/summary.txt"
PYTHONPATH=/tmp/site timeout 120 ncu --profile-from-start off -k regex:flash_bwd_sm90 --section SpeedOfLight \
    --section WarpStateStats --section InstructionStats python3 "$G/sink_profile.py" --b 16 --s 1024 --h 64 \
    --hk 8 --d 64 --causal > "$OUT/ncu_sink.txt" 2>&1
grep -E "Duration|Executed Instructions |flash_bwd_sm90|none done|sink done" "$OUT/ncu_sink.txt" | head -20 >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
# At most 8 files come back: everything in one archive, the summary beside it.
cd "$OUT" && tar czf results.tgz --exclude results.tgz --exclude summary.txt . && find . -maxdepth 1 -type f \
    ! -name results.tgz ! -name summary.txt -delete
