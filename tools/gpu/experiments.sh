#!/usr/bin/env bash
# Device side of the sm90 forward experiments that have not yet run on a GPU (docs/notes/cuda-sm90.md):
#   BN80:   head dim 256 with 80-key K/V blocks (FLASHATTN_SM90_BN=80; the default is 64 keys),
#   EPI:    the next tile's first S under the epilogue (FLASHATTN_NVRTC_OPTIONS=-DSM90_EPI_OVERLAP=1; d64, d128),
#   TSTORE: O stored by TMA boxes (FLASHATTN_SM90_TMA_STORE=1; d64, d128, not varlen), tested together with EPI,
#   PACK:   GQA query heads packed into one tile (FLASHATTN_SM90_PACK_GQA=1; groups dividing 128).
# Run from the repository root on the device machine after tools/gpu/prepare.sh here, with .gpu carried:
#   bash .gpu/experiments.sh correct256 # BN80, PACK: tests, check shapes, sanitizers (about 8 min)
#   bash .gpu/experiments.sh correct128 # EPI, EPI+TSTORE: tests, check shapes, sanitizers (about 8 min)
#   bash .gpu/experiments.sh bench256   # peers + d256 BN64 / BN80, GQA shapes unpacked / packed, two rounds (5 min)
#   bash .gpu/experiments.sh bench128   # peers + d64/d128 base / EPI / EPI+TSTORE / TSTORE, two rounds (about 8 min)
# Every GPU process runs under `timeout`. Output (at most 8 files come back): $OUT/summary.txt (each step, its
# exit status and last lines), $OUT/log.txt (everything), bench JSONs.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-/tmp/flashattn-kernels}
export FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick PYTHONUNBUFFERED=1
EPI=-DSM90_EPI_OVERLAP=1
BOTH=(env FLASHATTN_NVRTC_OPTIONS=$EPI FLASHATTN_SM90_TMA_STORE=1)

STEP_SUMMARY='test result|PASS|FAIL|failed|ERROR SUMMARY|RACECHECK SUMMARY|fwd90|fwd sm|panicked' STEP_LINES=6
# shellcheck source=step.sh
. "$G/step.sh"

checks() {  # shapes with partial blocks, GQA, masks, ALiBi + softcap, sq > sk (tiles without key blocks)
    local tag=$1 dims=$2
    for d in $dims; do
        step "$tag check d$d 1000" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 2 -s 1000 --heads 4
        step "$tag check d$d gqa causal 777x1500" 120 "$G/flashattn" check --device cuda --dtype f16 -d "$d" -b 1 -s 777 --seqlen-k 1500 --heads 6 --heads-k 2 --causal
        step "$tag check d$d alibi softcap 81x159" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 3 -s 81 --seqlen-k 159 --alibi --softcap 30 --causal
        step "$tag check d$d causal 1500x777" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 1 -s 1500 --seqlen-k 777 --heads 4 --heads-k 1 --causal
        step "$tag check d$d window 2000" 120 "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 1 -s 2000 --heads 2 --window 300,0 --backward
    done
}

case "${1:-}" in
correct256)
    nvidia-smi -L >> "$OUT/summary.txt" 2>&1
    step info 120 "$G/flashattn" info
    # Proof of the path: the kernel column names fwd90_d256_bn80_* / fwd90_d256_* for each setting.
    FLASHATTN_SM90_BN=80 step "BN80 path" 120 "$G/flashattn" bench --device cuda --shape 1,8,2048,256 --modes fwd --reps 3 --warmup 1
    FLASHATTN_SM90_BN=80 step "BN80 tests" 600 "$G/cuda" --test-threads 1 sweep_bf16 sweep_f16 small_variants
    FLASHATTN_SM90_BN=80 checks BN80 "256 192"
    FLASHATTN_SM90_BN=80 step "BN80 memcheck" 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 256 -b 1 -s 777 --seqlen-k 1500 --heads 6 --heads-k 2 --causal
    FLASHATTN_SM90_BN=80 step "BN80 racecheck" 300 compute-sanitizer --tool racecheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 256 -b 1 -s 300 --heads 2 --causal
    # GQA packing: the small variants run MHA/GQA/MQA shapes (the sweeps too); checks with groups 2, 4, 8, 32.
    P=(env FLASHATTN_SM90_PACK_GQA=1)
    step "PACK path" 120 "${P[@]}" "$G/flashattn" bench --device cuda --shape 2,32,512,128 --heads-k 8 --modes fwd --reps 3 --warmup 1
    step "PACK tests" 600 "${P[@]}" "$G/cuda" --test-threads 1 small_variants sweep_bf16 sweep_f16
    for d in 64 128 256; do
        step "PACK check d$d 32/8 causal 40x300" 120 "${P[@]}" "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 2 -s 40 --seqlen-k 300 --heads 32 --heads-k 8 --causal
        step "PACK check d$d 8/1 alibi softcap 77x77" 120 "${P[@]}" "$G/flashattn" check --device cuda --dtype f16 -d "$d" -b 3 -s 77 --heads 8 --heads-k 1 --alibi --softcap 20
        step "PACK check d$d 4/2 window 600" 120 "${P[@]}" "$G/flashattn" check --device cuda --dtype bf16 -d "$d" -b 1 -s 600 --heads 4 --heads-k 2 --window 100,20 --backward
    done
    step "PACK check 32/1 1500x777 causal" 120 "${P[@]}" "$G/flashattn" check --device cuda --dtype bf16 -d 128 -b 1 -s 1500 --seqlen-k 777 --heads 32 --heads-k 1 --causal
    step "PACK memcheck" 300 "${P[@]}" compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 128 -b 2 -s 40 --seqlen-k 300 --heads 32 --heads-k 8 --causal --alibi
    ;;
correct128)
    nvidia-smi -L >> "$OUT/summary.txt" 2>&1
    step info 120 "${BOTH[@]}" "$G/flashattn" info
    FLASHATTN_NVRTC_OPTIONS=$EPI step "EPI tests" 600 "$G/cuda" --test-threads 1 sweep_bf16 sweep_f16 small_variants determinism stress_no_nan
    FLASHATTN_NVRTC_OPTIONS=$EPI checks EPI "64 128"
    FLASHATTN_NVRTC_OPTIONS=$EPI FLASHATTN_SM90_BM=128 step "EPI check d64 128 rows" 120 "$G/flashattn" check --device cuda --dtype bf16 -d 64 -b 2 -s 1000 --heads 4 --causal
    FLASHATTN_NVRTC_OPTIONS=$EPI step "EPI memcheck" 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 128 -b 1 -s 1500 --seqlen-k 777 --heads 4 --heads-k 1 --causal
    FLASHATTN_NVRTC_OPTIONS=$EPI step "EPI racecheck" 300 compute-sanitizer --tool racecheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 64 -b 1 -s 700 --heads 2 --causal
    step "EPI+TSTORE tests" 600 "${BOTH[@]}" "$G/cuda" --test-threads 1 sweep_bf16 sweep_f16 small_variants raw_pointers_packed_qkv
    FLASHATTN_NVRTC_OPTIONS=$EPI FLASHATTN_SM90_TMA_STORE=1 checks EPI+TSTORE "64 128"
    step "EPI+TSTORE memcheck" 300 "${BOTH[@]}" compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype bf16 -d 128 -b 2 -s 1000 --heads 4 --heads-k 2 --causal
    ;;
bench256 | bench128)
    nvidia-smi -L >> "$OUT/summary.txt" 2>&1
    step "torch bf16 fwd" 400 python3 "$G/torch_baselines.py" --grid standard --modes fwd --dtype bf16 --json "$OUT/torch_bf16.json"
    B=("$G/flashattn" bench --device cuda --grid standard --modes fwd --dtype bf16 --baselines "$OUT/torch_bf16.json")
    # Round 1 keeps JSONs (at most 8 files come back: peers, summary, log and 4 or 5 of these); round 2 only tables.
    for round in 1 2; do
        j() { [ "$round" = 1 ] && echo --json "$OUT/$1.json"; }
        if [ "$1" = bench256 ]; then
            FLASHATTN_SM90_BN=64 step "d256 BN64 r$round" 300 "${B[@]}" --dims 256 $(j d256_bn64)
            FLASHATTN_SM90_BN=80 step "d256 BN80 r$round" 300 "${B[@]}" --dims 256 $(j d256_bn80)
            # GQA 32/8, d128, short and medium sequences (no peers at these points: ours packed vs unpacked).
            for shp in 64,32,128,128 16,32,512,128 4,32,2048,128; do
                step "GQA $shp unpacked r$round" 120 "$G/flashattn" bench --device cuda --shape "$shp" --heads-k 8 --modes fwd --causal 0,1
                step "GQA $shp packed r$round" 120 env FLASHATTN_SM90_PACK_GQA=1 "$G/flashattn" bench --device cuda --shape "$shp" --heads-k 8 --modes fwd --causal 0,1
            done
        else
            step "d64,d128 base r$round" 300 "${B[@]}" --dims 64,128 $(j d64_d128_base)
            FLASHATTN_NVRTC_OPTIONS=$EPI step "d64,d128 EPI r$round" 300 "${B[@]}" --dims 64,128 $(j d64_d128_epi)
            step "d64,d128 EPI+TSTORE r$round" 300 "${BOTH[@]}" "${B[@]}" --dims 64,128 $(j d64_d128_epi_tstore)
            FLASHATTN_SM90_TMA_STORE=1 step "d64,d128 TSTORE r$round" 300 "${B[@]}" --dims 64,128 $(j d64_d128_tstore)
        fi
    done
    ;;
*)
    echo "usage: $0 correct256|correct128|bench256|bench128" >&2
    exit 2
    ;;
esac
cat "$OUT/summary.txt"
