#!/usr/bin/env bash
# The short device call (about 3 minutes on an H100): the Rust CUDA tests (sinks, e4m3 KV cache, value head dims,
# the quick sweep) in parallel beside pytest on CUDA tensors (the tests in .gpu/tests, tools/gpu/prepare.sh), each
# with its own kernel cache, then a 2-round old/new timing against the CLI in .gpu/main/flashattn where present.
#   export OUT; timeout 330 bash .gpu/quick.sh; cat $OUT/summary.txt $OUT/oldnew.txt
set -u
G=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$G"/flashattn-*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/summary.txt"
t0=$SECONDS
job() { local name=$1 t=$2; shift 2
  (FLASHATTN_CACHE_DIR=/tmp/k-$name timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$? $((SECONDS - t0)) s" >> "$OUT/$name.log") & }
job sink 200 "$G/cuda_sink" --test-threads=1
job kvfp8 200 "$G/cuda_kvcache" kvcache_fp8_device --test-threads=1
job dv 200 "$G/cuda" value_head_dims --test-threads=1
job sweep 230 "$G/cuda" sweep --test-threads=1
(cd "$G/tests" && FLASHATTN_CACHE_DIR=/tmp/k-py FLASHATTN_TEST_DEVICES=cuda timeout 230 python3 -m pytest -q -p no:cacheprovider -rfE . > "$OUT/pytest.log" 2>&1; echo "pytest rc=$? $((SECONDS - t0)) s" >> "$OUT/pytest.log")
wait
for f in sink kvfp8 dv sweep pytest; do grep -E "test result|rc=|passed|failed|FAIL|panicked" "$OUT/$f.log" | tail -6 | cut -c1-400 >> "$OUT/summary.txt"; done
[ -x "$G/main/flashattn" ] && for i in 1 2; do for bin in flashattn main/flashattn; do
  for pt in "2,16,8192,128 0 fwd" "1,16,16384,128 1 fwd" "4,16,4096,64 1 fwd" "2,16,8192,128 1 fwd_bwd"; do
    read -r shape causal mode <<<"$pt"
    echo "$i $bin $(FLASHATTN_CACHE_DIR=/tmp/k-ab timeout 40 "$G/$bin" bench --shape "$shape" --causal "$causal" --modes "$mode" --warmup 15 --reps 60 2>&1 | tail -1)" >> "$OUT/oldnew.txt"
  done; done; done
echo "total $((SECONDS - t0)) s" >> "$OUT/summary.txt"
