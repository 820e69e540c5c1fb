#!/bin/bash
# The spec's full CPU sweep (FLASHATTN_SWEEP=full: 3 dtypes x 12 head dims x 17 shapes x MHA/GQA/MQA x 6 variants,
# forward and backward, each case against the f64 oracle under the accuracy rule), plus the KV-cache sweep, on
# this machine's cores. The cases are split into NPROC processes of equal projected cost (FLASHATTN_SWEEP_SHARD),
# each running its cases in parallel on CORES/NPROC threads, each under `timeout`.
#
#   bash .gpu/sweep/run.sh [CALL [CALLS]]
# CALLS > 1 splits the sweep over that many device calls (NPROC*CALLS shards); call CALL (0-based) runs its
# NPROC shards. Writes to $OUT (at most 8 files): summary.txt, shard<j>.log, kvcache.log.
# Expects the stripped test binaries `cpu_sweep` and `kvcache` next to it:
#   cargo test --release -p flashattn --test cpu_sweep --test kvcache --no-run --message-format=json
# gives their paths. Measured cost: docs/notes/cpu.md ("The full CPU sweep").
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT=${OUT:-/tmp/sweep-out}
mkdir -p "$OUT"
CALL=${1:-0}
CALLS=${2:-1}
CORES=${CORES:-$(nproc)}
NPROC=${NPROC:-4}
THREADS=$(( CORES / NPROC )); [ "$THREADS" -lt 1 ] && THREADS=1
LIMIT=${LIMIT:-575}          # seconds for the whole script (the device call allows 600)
N=$(( NPROC * CALLS ))
S="$OUT/summary.txt"
{
  echo "cpu full sweep: call $CALL of $CALLS, $NPROC processes x $THREADS threads, shards of $N, limit ${LIMIT}s"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) cpus); flags avx2=$(grep -c -m1 avx2 /proc/cpuinfo) fma=$(grep -c -m1 ' fma' /proc/cpuinfo) avx512f=$(grep -c -m1 avx512f /proc/cpuinfo)"
  free -g | head -2
} > "$S"
if [ "$CALL" = 0 ]; then
  # The KV-cache sweep (paged 1/16/256 and unpaged, rotary none/half/full, interleaved, leftpad, batch index).
  T1=$SECONDS
  timeout -k 5 60 "$HERE/kvcache" --test-threads="$CORES" --nocapture > "$OUT/kvcache.log" 2>&1
  echo "kvcache: rc $? in $(( SECONDS - T1 ))s: $(grep -h -E 'kvcache sweep:|test result' "$OUT/kvcache.log" | tr '\n' ' ')" >> "$S"
fi
T0=$SECONDS
LIMIT=$(( LIMIT - SECONDS ))   # the whole script stays within the budget
pids=()
for j in $(seq 0 $(( NPROC - 1 ))); do
  i=$(( CALL * NPROC + j ))
  FLASHATTN_SWEEP=full FLASHATTN_SWEEP_SHARD="$i/$N" RAYON_NUM_THREADS=$THREADS FLASHATTN_PROGRESS=1 \
    timeout -k 10 "$LIMIT" "$HERE/cpu_sweep" --test-threads=1 --nocapture > "$OUT/shard$j.log" 2>&1 &
  pids+=($!)
done
rcs=()
for p in "${pids[@]}"; do wait "$p"; rcs+=($?); done
echo "shards done in $(( SECONDS - T0 ))s; exit codes: ${rcs[*]} (124 = timed out)" >> "$S"
for j in $(seq 0 $(( NPROC - 1 ))); do
  if [ "${rcs[$j]}" != 0 ]; then echo "-- shard$j.log ends:"; tail -n 3 "$OUT/shard$j.log"; fi
done >> "$S"
grep -h -E "cpu sweep|cpu small exhaustive|cpu determinism|cpu stress|^test result|FAIL|ERROR|panicked" "$OUT"/shard*.log >> "$S"
run=$(grep -h -o "[0-9]* cases run" "$OUT"/shard*.log | awk '{s+=$1} END {print s+0}')
pass=$(grep -h -o "[0-9]* passed, [0-9]* failed in" "$OUT"/shard*.log | awk '{s+=$1} END {print s+0}')
fail=$(grep -h -o "[0-9]* failed in" "$OUT"/shard*.log | awk '{s+=$1} END {print s+0}')
finished=$(grep -h -c "cases run" "$OUT"/shard*.log | awk '{s+=$1} END {print s+0}')
echo "TOTAL call $CALL/$CALLS: $run cases run, $pass passed, $fail failed; $finished of $(( NPROC * 7 )) sweep tests finished; wall $(( SECONDS - T0 ))s" >> "$S"
tail -n 12 "$S"
