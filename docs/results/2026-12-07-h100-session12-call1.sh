#!/usr/bin/env bash
# Session 12 call 1. (1) The FP8 forward (main's working tree: fwd_sm90.cu IS_FP8): the CUDA FP8 sweep (quick, then
# medium), CLI checks per head dim, probes through `flashattn run`, pytest test_fp8.py on CUDA, memcheck and
# racecheck; then a bench of e4m3 against bf16 (standard grid, fwd). (2) Branch dq-tensor (.gpu/dqt): full sweeps
# bf16/f16, deterministic tests, racecheck d64, A/B d64 fwd_bwd. (3) Issue 16's flush probe (main's wheel).
# Logs go to $W; $OUT receives summary.txt and a tarball of $W after each phase (at most 8 files come back).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=/tmp/w; mkdir -p $W
export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_REQUIRE_GPU=1
S=$(date +%s)
T() { echo "$1 t=$(( $(date +%s)-S ))" >> "$OUT/summary.txt"; }
snap() { tar czf "$OUT/r$1.tgz" -C $W . ; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT/summary.txt"
D=$G/dqt
# --- correctness, in parallel
(FLASHATTN_SWEEP=quick timeout 100 "$G/cuda" --exact fp8_sweep --nocapture --test-threads=1 > $W/t_fp8q.log 2>&1; echo "rc=$?" >> $W/t_fp8q.log
 FLASHATTN_SWEEP=medium timeout 40 "$G/cuda" --exact fp8_sweep --nocapture --test-threads=1 > $W/t_fp8m.log 2>&1; echo "rc=$?" >> $W/t_fp8m.log) &
(for d in 64 128 256; do for c in "" "--causal"; do timeout 20 "$G/flashattn" check --device cuda --dtype e4m3 -d $d -b 2 -s 300 --seqlen-k 517 --heads 8 --heads-k 2 $c 2>&1 | tail -3; done; done > $W/t_fp8check.log 2>&1
 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype e4m3 -d 128 -b 2 -s 300 --seqlen-k 517 --causal > $W/t_fp8mem.log 2>&1; echo "memcheck rc=$?" >> $W/t_fp8mem.log
 timeout 40 compute-sanitizer --tool racecheck --error-exitcode 9 "$G/flashattn" check --device cuda --dtype e4m3 -d 64 -b 1 -s 300 --causal > $W/t_fp8race.log 2>&1; echo "racecheck rc=$?" >> $W/t_fp8race.log) &
(python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_main "$G"/flashattn-*.whl
 env -C "$G/tests" PYTHONPATH=/tmp/site_main FLASHATTN_TEST_DEVICES=cuda timeout 110 python3 -m pytest -q -p no:cacheprovider test_fp8.py > $W/t_pyfp8.log 2>&1; echo "pytest fp8 rc=$?" >> $W/t_pyfp8.log) &
(mkdir -p $W/probe; for f in "$G"/probe/*.safetensors; do n=$(basename "$f" .safetensors)
   timeout 15 "$G/flashattn" run -i "$f" -o "$W/probe/$n.out.safetensors" --device cuda > "$W/probe/$n.log" 2>&1; echo "$n rc=$?" >> $W/probe/rc.txt; done) &
(FLASHATTN_SWEEP=quick timeout 110 "$D/cuda" --exact sweep_bf16 --test-threads=1 > $W/t_bf16.log 2>&1; echo "rc=$?" >> $W/t_bf16.log) &
(FLASHATTN_SWEEP=quick timeout 110 "$D/cuda" --exact sweep_f16 --test-threads=1 > $W/t_f16.log 2>&1; echo "rc=$?" >> $W/t_f16.log) &
(FLASHATTN_SWEEP=quick timeout 110 "$D/cuda" determinism deterministic_sweep sm90_backward_wide_heads small_variants --test-threads=1 > $W/t_other.log 2>&1; echo "rc=$?" >> $W/t_other.log) &
wait; T tests
cat $W/probe/rc.txt >> "$OUT/summary.txt"
grep -hE "test result|rc=|cuda fp8|SKIP|FAIL|panicked|ERROR SUMMARY|passes|fails|passed|failed" $W/t_*.log | cut -c1-300 >> "$OUT/summary.txt"
snap 1
# --- benchmarks (nothing else on the GPU)
timeout 60 "$G/flashattn" bench --device cuda --grid standard --dtype e4m3 --modes fwd --json $W/fp8_e4m3.json > $W/fp8_bench.txt 2>&1
timeout 60 "$G/flashattn" bench --device cuda --grid standard --dtype bf16 --modes fwd --json $W/fp8_bf16.json >> $W/fp8_bench.txt 2>&1
T fp8bench; grep -E "e4m3|bf16" $W/fp8_bench.txt | head -40 >> "$OUT/summary.txt"; snap 2
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$D"/flashattn-*.whl
OFF=--nvrtc-option=-DBWD90_DQ_TENSOR=0
B() { timeout 60 "$D/flashattn" bench --grid standard --dims 64 --modes fwd_bwd "$@" > /dev/null 2>&1; }
for r in 1 2; do B --json $W/ab_new$r.json; B $OFF --json $W/ab_old$r.json; done
B --deterministic --json $W/ab_newdet1.json; B $OFF --deterministic --json $W/ab_olddet1.json
T ab; snap 3
cat > /tmp/race64.py <<'PY'
import torch, flashattn
for det in (False, True):
    for causal in (False, True):
        q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flashattn.flash_attn_func(q, k, v, causal=causal, deterministic=det).sum().backward()
torch.cuda.synchronize(); print("ok")
PY
PYTHONPATH=/tmp/site timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 python3 /tmp/race64.py > $W/race64.txt 2>&1; T "racecheck dqt d64 rc=$?"
tail -2 $W/race64.txt >> "$OUT/summary.txt"
mkdir -p $W/fp
OUT="$W/fp" timeout 200 bash "$G/python.sh" flushprobe > /dev/null 2>&1; T "flushprobe rc=$?"
snap 4
