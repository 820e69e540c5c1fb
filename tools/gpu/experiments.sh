#!/usr/bin/env bash
# Device side of the sm90 forward's head dim 256 tile choice (docs/notes/cuda-sm90.md):
#   BN80: head dim 256 with 80-key K/V blocks (`flashattn --sm90-bn 80`, `Tuning::sm90_wide_kv_d256`; the rule's
#         choice except on masked problems below 2k keys), against the 64-key blocks (`--sm90-bn 64`).
# Run from the repository root on the device machine after tools/gpu/prepare.sh here, with .gpu carried:
#   bash .gpu/experiments.sh correct256 # BN80: tests, check shapes, sanitizers (about 6 min)
#   bash .gpu/experiments.sh bench256   # peers + d256 BN64 / BN80, two rounds (about 4 min)
# Every GPU process runs under `timeout`. Output (at most 8 files come back): $OUT/summary.txt (each step, its
# exit status and last lines), $OUT/log.txt (everything), bench JSONs.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-/tmp/flashattn-kernels}
export FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick PYTHONUNBUFFERED=1

STEP_SUMMARY='test result|PASS|FAIL|failed|ERROR SUMMARY|RACECHECK SUMMARY|fwd90|fwd sm|panicked' STEP_LINES=6
# shellcheck source=step.sh
. "$G/step.sh"

checks() {  # shapes with partial blocks, GQA, masks, ALiBi + softcap, sq > sk (tiles without key blocks)
    local tag=$1 dims=$2
    shift 2
    for d in $dims; do
        step "$tag check d$d 1000" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 2 -s 1000 --heads 4 "$@"
        step "$tag check d$d gqa causal 777x1500" 120 "$G/flashattn" check --device cuda --dtype f16 -d "$d" -b 1 -s 777 --seqlen-k 1500 --heads 6 --heads-k 2 --causal "$@"
        step "$tag check d$d alibi softcap 81x159" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 3 -s 81 --seqlen-k 159 --alibi --softcap 30 --causal "$@"
        step "$tag check d$d causal 1500x777" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 1 -s 1500 --seqlen-k 777 --heads 4 --heads-k 1 --causal "$@"
        step "$tag check d$d window 2000" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 1 -s 2000 --heads 2 --window 300,0 --backward "$@"
    done
}

case "${1:-}" in
correct256)
    nvidia-smi -L >> "$OUT/summary.txt" 2>&1
    step info 120 "$G/flashattn" info
    # Proof of the path: the kernel column names fwd90_d256_bn80_* / fwd90_d256_* for each setting.
    step "BN80 path" 120 "$G/flashattn" bench --device cuda --shape 1,8,2048,256 --modes fwd --reps 3 --warmup 1 --sm90-bn 80
    # The test binary's d256 sweeps: the rule's (80 keys mostly) and the 64-key form forced (their cases carry the
    # tuning; on Hopper each fails if no forward took the sm90 path).
    step "d256 tests" 600 "$G/cuda" --test-threads 1 sweep_d256_bn64 sweep_f16
    checks BN80 "256 192" --sm90-bn 80
    step "BN80 memcheck" 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 256 -b 1 -s 777 --seqlen-k 1500 --heads 6 --heads-k 2 --causal --sm90-bn 80
    step "BN80 racecheck" 300 compute-sanitizer --tool racecheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 256 -b 1 -s 300 --heads 2 --causal --sm90-bn 80
    ;;
bench256)
    nvidia-smi -L >> "$OUT/summary.txt" 2>&1
    step "torch bf16 fwd" 400 python3 "$G/torch_baselines.py" --grid standard --modes fwd --dtype bf16 --json "$OUT/torch_bf16.json"
    B=("$G/flashattn" bench --device cuda --grid standard --modes fwd --dtype bf16 --baselines "$OUT/torch_bf16.json")
    # Round 1 keeps JSONs; round 2 only tables.
    for round in 1 2; do
        j() { [ "$round" = 1 ] && echo --json "$OUT/$1.json"; }
        step "d256 BN64 r$round" 300 "${B[@]}" --dims 256 --sm90-bn 64 $(j d256_bn64)
        step "d256 BN80 r$round" 300 "${B[@]}" --dims 256 --sm90-bn 80 $(j d256_bn80)
    done
    ;;
*)
    echo "usage: $0 correct256|bench256" >&2
    exit 2
    ;;
esac
cat "$OUT/summary.txt"
