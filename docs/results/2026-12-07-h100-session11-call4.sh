#!/usr/bin/env bash
# Session 11 call 4: DQ_BULK at d128 only, deterministic mode through the writer warp: CUDA tests (quick sweeps,
# deterministic), A/B, cuDNN side by side, racecheck of the deterministic mode; the package's forward under ncu
# beside the CLI's (issue 16's gap).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels FLASHATTN_ALLOW_SPILLS=1
S=$(date +%s)
T() { echo "$1 t=$(( $(date +%s)-S ))" >> "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$OUT/summary.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$G"/flashattn-*.whl
export FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick
(FLASHATTN_SWEEP=full timeout 320 "$G/cuda" --exact sweep_bf16 --test-threads=1 > "$OUT/t_bf16.log" 2>&1; echo "rc=$?" >> "$OUT/t_bf16.log") &
(FLASHATTN_SWEEP=full timeout 320 "$G/cuda" --exact sweep_f16 --test-threads=1 > "$OUT/t_f16.log" 2>&1; echo "rc=$?" >> "$OUT/t_f16.log") &
(timeout 320 "$G/cuda" determinism deterministic_sweep sm90_backward_wide_heads small_variants value_head_dims raw_pointers --test-threads=1 > "$OUT/t_other.log" 2>&1; echo "rc=$?" >> "$OUT/t_other.log") &
wait; T tests
grep -hE "test result|rc=|passed|FAILED|panicked" "$OUT"/t_*.log | cut -c1-250 >> "$OUT/summary.txt"
unset FLASHATTN_SWEEP
cat > /tmp/pkg.py <<'PY'
import torch, flashattn
q, k, v = (torch.randn(4, 4096, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(3): flashattn.flash_attn_func(q, k, v)
torch.cuda.synchronize(); torch.cuda.profiler.start(); flashattn.flash_attn_func(q, k, v); torch.cuda.synchronize(); torch.cuda.profiler.stop()
PY
PYTHONPATH=/tmp/site timeout 60 ncu --profile-from-start off --section LaunchStats --section SpeedOfLight python3 /tmp/pkg.py > "$OUT/ncu_pkg.txt" 2>&1
timeout 60 ncu -k regex:flash_fwd --launch-skip 3 --launch-count 2 --section LaunchStats --section SpeedOfLight "$G/flashattn" bench --device cuda --shape 4,16,4096,128 --modes fwd --causal 0 --warmup 3 --reps 3 > "$OUT/ncu_cli.txt" 2>&1
M=gpu__time_duration.sum,lts__t_requests_op_red.sum,lts__t_sectors_op_red.sum,lts__t_sectors_op_read.sum,lts__t_sectors.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
for v in d64red d64bulk d128bulk; do
  case $v in d64red) a="--shape 4,32,4096,64";; d64bulk) a="--shape 4,32,4096,64 --nvrtc-option=-DBWD90_DQ_BULK=2";; d128bulk) a="--shape 4,16,4096,128";; esac
  timeout 60 ncu --metrics $M --section WarpStateStats --section SchedulerStats -k regex:flash_bwd_sm90 --launch-skip 2 --launch-count 1 \
    "$G/flashattn" bench --device cuda $a --modes fwd_bwd --warmup 2 --reps 2 --causal 0 > "$OUT/ncu_$v.txt" 2>&1
done
T ncu
OFF=--nvrtc-option=-DBWD90_DQ_BULK=0
B() { timeout 60 "$G/flashattn" bench --grid standard --dims 128 --modes fwd_bwd "$@" > /dev/null 2>&1; }
for r in 1 2; do
  B --json "$OUT/ab_new$r.json"; B $OFF --json "$OUT/ab_old$r.json"
  B --deterministic --json "$OUT/ab_newdet$r.json"; B $OFF --deterministic --json "$OUT/ab_olddet$r.json"
done
T ab
timeout 150 python3 "$G/torch_baselines.py" --grid standard --backends cudnn --modes fwd_bwd --json "$OUT/peers_bwd.json" > /dev/null 2>&1; T peers
timeout 100 "$G/flashattn" bench --grid standard --modes fwd_bwd --json "$OUT/cli_bwd.json" > /dev/null 2>&1; T cli
cat > /tmp/racedet.py <<'PY'
import torch, flashattn
for causal in (False, True):
    q, k, v = (torch.randn(1, 300, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flashattn.flash_attn_func(q, k, v, causal=causal, deterministic=True).sum().backward()
torch.cuda.synchronize(); print("ok")
PY
PYTHONPATH=/tmp/site timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 python3 /tmp/racedet.py > "$OUT/race_det.txt" 2>&1; T "racecheck det rc=$?"
tail -2 "$OUT/race_det.txt" >> "$OUT/summary.txt"
