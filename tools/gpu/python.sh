#!/usr/bin/env bash
# Device side of the Python package's checks (issue: PyTorch users can use flashattn). Run from the repository
# root on the device machine after tools/gpu/prepare.sh here (it puts the wheel, the CLI, the CUDA test binaries
# and the peers' script into .gpu/), with .gpu carried:
#   bash .gpu/python.sh correct   # pytest on CUDA tensors; the Rust CUDA tests; memcheck on a reduced pytest run
#   bash .gpu/python.sh bench     # peers + the package (torch_baselines.py) beside `flashattn bench`; host overhead
#   bash .gpu/python.sh all       # both
#   bash .gpu/python.sh pytest overhead decode harness   # any list of steps: pytest on CUDA tensors only, the
#                                 # host overhead, the decode grid, the harness comparison (run_harness); `sdpa`
#                                 # (SDPA_GRID=standard for the standard grid), `hf` (hf_bench.py), `grid`,
#                                 # `pkgcli` (the package against the CLI, two rounds), `interleaved` (the
#                                 # package and the CLI alternating point by point, five rounds;
#                                 # INTERLEAVED_SEQLENS=1024,... to skip 512), ...
# Every GPU process runs under `timeout`. Output: $OUT/summary.txt (each step, its status, its last lines),
# $OUT/log.txt (everything), JSON results.
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-/tmp/flashattn-kernels}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$G"/flashattn-*.whl || exit 1
export PYTHONPATH=/tmp/site

STEP_SUMMARY='passed|failed|test result|ERROR SUMMARY|error|Error|us/call|calls:' STEP_LINES=8
# shellcheck source=step.sh
. "$G/step.sh"

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c 'import torch, flashattn; print("torch", torch.__version__, flashattn.info())' >> "$OUT/summary.txt" 2>&1
# The Python tests: the checkout's, or PYTESTS (a branch's copy in .gpu, tools/gpu/prepare.sh --tests).
T=${PYTESTS:-$(pwd)/python/tests}
# The CUDA non-finite tests (each runs both kernel paths in one process: the sm80-class one is forced through
# the call's tuning), where the branch that adds them is built (cuda-nan).
nonfinite() {
    [ -x "$G/cuda_nonfinite" ] || return 0
    FLASHATTN_REQUIRE_GPU=1 timeout "$1" "$G/cuda_nonfinite" --test-threads=1 >> "$OUT/rust_cuda.log" 2>&1
    echo "rc=$?" >> "$OUT/rust_cuda.log"
}
# The e4m3 KV-cache test (decoding from FP8 caches).
kvfp8() {
    FLASHATTN_REQUIRE_GPU=1 timeout "$1" "$G/cuda_kvcache" kvcache_fp8_device --test-threads=1 >> "$OUT/rust_cuda.log" 2>&1
    echo "cuda_kvcache fp8 rc=$?" >> "$OUT/rust_cuda.log"
}
# The CUDA learnable-sink tests (forward, backward with dsink on both kernel paths, KV decode).
sinktests() {
    [ -x "$G/cuda_sink" ] || return 0
    FLASHATTN_REQUIRE_GPU=1 timeout "$1" "$G/cuda_sink" --test-threads=1 >> "$OUT/rust_cuda.log" 2>&1
    echo "cuda_sink rc=$?" >> "$OUT/rust_cuda.log"
}
run_correct() {
    # The Rust CUDA tests run beside pytest (they share the GPU and the kernel cache; each under its timeout).
    # Their own kernel cache: the compile test wants fresh compiles (ptxas reports), not pytest's cached cubins.
    # Spills of the hot kernels are an open item reported as a warning, as CI does (FLASHATTN_ALLOW_SPILLS).
    (export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-rust FLASHATTN_ALLOW_SPILLS=1
     FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick timeout 420 "$G/cuda" --test-threads=1 > "$OUT/rust_cuda.log" 2>&1
     echo "rc=$?" >> "$OUT/rust_cuda.log"
     FLASHATTN_REQUIRE_GPU=1 timeout 240 "$G/cuda_kvcache" --test-threads=1 >> "$OUT/rust_cuda.log" 2>&1
     echo "rc=$?" >> "$OUT/rust_cuda.log"
     nonfinite 240
     sinktests 200) &
    step pytest-cuda 450 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rf .
    step memcheck 240 env -C "$T" FLASHATTN_TEST_DEVICES=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 -m pytest -q -p no:cacheprovider -x \
        "test_attention.py::test_flash_attn_func[cuda-1-causal]" "test_attention.py::test_varlen[cuda-alibi]" \
        "test_attention.py::test_varlen_seqused_k[cuda]" "test_kvcache.py::test_kvcache[cuda-6]" \
        "test_errors.py::test_bad_device_metadata_stays_in_bounds" \
        "test_errors.py::test_kvcache_overflow_writes_nothing[cuda]" "test_torch.py::test_cuda_graph_decode_replay"
    wait
    grep -E "test result|rc=|panicked|FAILED|failed" "$OUT/rust_cuda.log" >> "$OUT/summary.txt"
}
run_bench() {
    step overhead 60 python3 "$G/overhead.py" --json "$OUT/overhead.json"
    step peers-standard 230 python3 "$G/torch_baselines.py" --grid standard --backends fa2,cudnn,flashattn \
        --json "$OUT/peers_standard.json"
    step cli-standard 150 "$G/flashattn" bench --grid standard --json "$OUT/cli_standard.json"
    step peers-decode 60 python3 "$G/torch_baselines.py" --grid decode --backends fa2,cudnn,flashattn \
        --json "$OUT/peers_decode.json"
    step cli-decode 60 "$G/flashattn" bench --grid decode --json "$OUT/cli_decode.json"
}
# The short form for a call with little device time left: pytest on CUDA (the Rust non-finite and KV tests
# beside it), then the quick and decode grids with the host overhead, then memcheck on three tests.
run_final() {
    (export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-rust FLASHATTN_REQUIRE_GPU=1
     nonfinite 100
     timeout 100 "$G/cuda_kvcache" --test-threads=1 >> "$OUT/rust_cuda.log" 2>&1; echo "rc=$?" >> "$OUT/rust_cuda.log") &
    step pytest-cuda 150 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rf .
    wait
    grep -E "test result|rc=|panicked|FAILED" "$OUT/rust_cuda.log" >> "$OUT/summary.txt"
    step overhead 40 python3 "$G/overhead.py" --json "$OUT/overhead.json"
    step peers-quick 40 python3 "$G/torch_baselines.py" --grid quick --backends fa2,cudnn,flashattn \
        --json "$OUT/peers_standard.json"
    step cli-quick 30 "$G/flashattn" bench --grid quick --json "$OUT/cli_standard.json"
    step peers-decode 40 python3 "$G/torch_baselines.py" --grid decode --backends fa2,cudnn,flashattn \
        --json "$OUT/peers_decode.json"
    step cli-decode 20 "$G/flashattn" bench --grid decode --json "$OUT/cli_decode.json"
    step memcheck 60 env -C "$T" FLASHATTN_TEST_DEVICES=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 -m pytest -q -p no:cacheprovider \
        "test_attention.py::test_varlen_seqused_k[cuda]" "test_kvcache.py::test_kvcache[cuda-6]" \
        "test_errors.py::test_bad_device_metadata_stays_in_bounds" "test_errors.py::test_kvcache_overflow_writes_nothing[cuda]"
}
# Whether the package's forward figures differ from the CLI's by the harness (GPU clocks under triton's
# do_bench, ~125 ms of back-to-back calls per point after the peers' own, against the CLI's 40 calls): head dim
# 128 forward through the CLI with its default and with do_bench-like repetitions, through the package alone
# and beside the peers, with the SM clock and power sampled every 100 ms (clocks.csv, marks.txt).
run_harness() {
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 \
        > "$OUT/clocks.csv" 2>&1 &
    local smi=$!
    mark() { echo "$(date +%H:%M:%S.%N | cut -c1-12) $1" >> "$OUT/marks.txt"; }
    mark start
    step cli-reps30 60 "$G/flashattn" bench --grid standard --dims 128 --modes fwd --json "$OUT/h_cli30.json"
    mark cli-reps30
    step cli-reps110 90 "$G/flashattn" bench --grid standard --dims 128 --modes fwd --warmup 28 --reps 110 \
        --json "$OUT/h_cli110.json"
    mark cli-reps110
    step pkg-alone 90 python3 "$G/torch_baselines.py" --grid standard --backends flashattn --modes fwd \
        --json "$OUT/h_pkg_alone.json"
    mark pkg-alone
    step pkg-peers 120 python3 "$G/torch_baselines.py" --grid standard --backends fa2,cudnn,flashattn --modes fwd \
        --json "$OUT/h_pkg_peers.json"
    mark pkg-peers
    kill "$smi"
}
# The kernels before and after a change, where .gpu/flashattn-old exists (a CLI built from the earlier
# commit): three forward points and one forward+backward, three rounds, the binaries in the order given
# (oldnew: old first; newold: new first, against ordering drift), both with the same fixed counts (the CLIs'
# defaults may differ). oldnew.txt.
run_ab() {
    [ -x "$G/$1" ] && [ -x "$G/$2" ] || return 0
    local i bin shape causal
    for i in 1 2 3; do
        for bin in "$@"; do
            for pt in "2,16,8192,128 0 fwd" "1,16,16384,128 1 fwd" "4,16,4096,64 1 fwd" "2,16,8192,128 1 fwd_bwd"; do
                read -r shape causal mode <<<"$pt"
                echo "$i $bin $(timeout 60 "$G/$bin" bench --shape "$shape" --causal "$causal" --modes "$mode" \
                    --warmup 15 --reps 60 2>&1 | tail -1)" >> "$OUT/oldnew.txt"
            done
        done
    done
}
# PyTorch's FA2 backend of F.scaled_dot_product_attention before and after flashattn.sdpa.activate() (the same
# script, the flash backend only), on the quick grid.
run_sdpa() {
    local grid=${SDPA_GRID:-quick}
    step sdpa-off 200 python3 "$G/torch_baselines.py" --grid "$grid" --backends fa2 --json "$OUT/sdpa_off.json"
    step sdpa-on 200 python3 -c 'import runpy, sys, flashattn.sdpa
flashattn.sdpa.activate()
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("flashattn.sdpa calls:", flashattn.sdpa.calls)' "$G/torch_baselines.py" --grid "$grid" --backends fa2 \
        --json "$OUT/sdpa_on.json"
}
# The criterion's comparison with the CLI's time-based repetitions: the peers and the package (standard grid,
# forward and forward+backward) beside `flashattn bench` in its default (do_bench-like) mode.
run_grid() {
    step peers-standard 230 python3 "$G/torch_baselines.py" --grid standard --backends fa2,cudnn,flashattn \
        --json "$OUT/peers_standard.json"
    step cli-standard 150 "$G/flashattn" bench --grid standard --json "$OUT/cli_standard.json"
}
# The package against the CLI on the standard grid, two alternating rounds: PKGCLI_BACKENDS picks the peers run
# before the package at each point (default flashattn alone; fa2,flashattn as torch_baselines.py's usual order),
# PKGCLI_MODES the modes (default fwd); pkg_vs_cli.txt has the per-point table (tools/gpu/pkg_vs_cli.py).
run_pkgcli() {
    local r be=${PKGCLI_BACKENDS:-flashattn} modes=${PKGCLI_MODES:-fwd}
    for r in 1 2; do
        step "peers-r$r" 150 python3 "$G/torch_baselines.py" --grid standard --backends "$be" --modes "$modes" \
            --json "$OUT/pkgcli_peers_r$r.json"
        step "cli-r$r" 100 "$G/flashattn" bench --grid standard --modes "$modes" --json "$OUT/pkgcli_cli_r$r.json"
    done
    python3 "$G/pkg_vs_cli.py" --markdown --peers "$OUT"/pkgcli_peers_r{1,2}.json --cli "$OUT"/pkgcli_cli_r{1,2}.json \
        > "$OUT/pkg_vs_cli.txt" 2>&1
    tail -1 "$OUT/pkg_vs_cli.txt" >> "$OUT/summary.txt"
}
# The decode kernel's key-split count by hand (`--num-splits`, 0 = the plan's choice) at two large-cache points,
# against the plan's own choice: splits.txt.
run_splits() {
    local n pt b s
    for pt in "8 128k" "1 128k" "32 32k"; do
        read -r b s <<<"$pt"
        for n in 0 8 12 16 20 24 32 33 48 64; do
            echo "b=$b s=$s splits=$n $(timeout 60 "$G/flashattn" bench --grid decode --seqlens "$s" --batch "$b" \
                --num-splits "$n" --warmup 10 --reps 60 2>&1 | tail -1)" >> "$OUT/splits.txt"
        done
    done
    # The pipeline depth at the point short of FA2 (8, 128k): 4 stages (1 CTA per SM) with a few split counts.
    for n in 0 8 16 33; do
        echo "b=8 s=128k splits=$n stages=4 $(timeout 60 "$G/flashattn" bench --grid decode --seqlens 128k \
            --batch 8 --num-splits "$n" --kv-stages 4 --warmup 10 --reps 60 2>&1 | tail -1)" >> "$OUT/splits.txt"
    done
}
# One Rust CUDA test with a fixed seed (REPRO_TEST, REPRO_SEED: every case of the test draws from that seed), in
# main's binary and, where present, each branch's (.gpu/NAME/cuda, tools/gpu/prepare_branch.sh): whether a failure
# seen once is the code's or the draw's.
run_repro() {
    [ -n "${REPRO_TEST:-}" ] || return 0
    local bin
    for bin in "$G"/cuda "$G"/*/cuda; do
        [ -x "$bin" ] || continue
        echo "== $bin $REPRO_TEST seed $REPRO_SEED" >> "$OUT/repro.log"
        FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-repro FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SEED="$REPRO_SEED" \
            timeout 150 "$bin" "$REPRO_TEST" --test-threads=1 >> "$OUT/repro.log" 2>&1
        echo "$bin rc=$?" >> "$OUT/repro.log"
    done
    grep -E "passed|failed|rc=|^FAIL" "$OUT/repro.log" | cut -c1-300 >> "$OUT/summary.txt"
}
# The short correctness call: the Rust CUDA quick sweep, the sink, e4m3 KV and value head dim tests beside pytest on
# CUDA tensors, then memcheck on the sink backward's and the e4m3 KV cache's pytest cases.
run_verify() {
    (export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-rust FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_REQUIRE_GPU=1
     sinktests 150
     kvfp8 150
     FLASHATTN_SWEEP=quick timeout 150 "$G/cuda" --test-threads=1 value_head_dims >> "$OUT/rust_cuda.log" 2>&1
     echo "cuda value_head_dims rc=$?" >> "$OUT/rust_cuda.log"
     FLASHATTN_SWEEP=quick timeout 240 "$G/cuda" --test-threads=1 sweep >> "$OUT/rust_cuda.log" 2>&1
     echo "cuda sweep rc=$?" >> "$OUT/rust_cuda.log") &
    step pytest-cuda 280 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rfEsxX .
    wait
    grep -E "test result|rc=|panicked|FAILED|failed" "$OUT/rust_cuda.log" | cut -c1-300 >> "$OUT/summary.txt"
    step memcheck 80 env -C "$T" FLASHATTN_TEST_DEVICES=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 -m pytest -q -p no:cacheprovider -x "test_sink.py::test_sink_forward_and_gradients[cuda-0.0-True]" \
        "test_sink.py::test_sink_decode_splits[cuda-3]"
    step memcheck-fp8 80 env -C "$T" FLASHATTN_TEST_DEVICES=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 -m pytest -q -p no:cacheprovider -x test_fp8.py -k "kvcache"
}
# The smallest sink check: the Rust sink tests (forward, backward, dsink, KV decode) beside the sink pytest cases.
run_sinkcheck() {
    (export FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-rust FLASHATTN_ALLOW_SPILLS=1; sinktests 170) &
    step pytest-sinks 120 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rfEsxX \
        test_sink.py test_value_dim.py -k sink
    wait
    grep -E "test result|rc=|panicked|FAILED|failed" "$OUT/rust_cuda.log" | cut -c1-300 >> "$OUT/summary.txt"
}
run_pytest() {
    step pytest-cuda 300 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rfEsxX .
}
# The reduced memcheck run of issue 16 (bad device metadata, the refused KV append, the CUDA-graph decode replay,
# varlen with ALiBi, the sink backward, the e4m3 KV cache).
run_memcheck() {
    step memcheck 150 env -C "$T" FLASHATTN_TEST_DEVICES=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 -m pytest -q -p no:cacheprovider \
        "test_attention.py::test_flash_attn_func[cuda-1-causal]" "test_attention.py::test_varlen[cuda-alibi]" \
        "test_attention.py::test_varlen_seqused_k[cuda]" "test_kvcache.py::test_kvcache[cuda-6]" \
        "test_errors.py::test_bad_device_metadata_stays_in_bounds" \
        "test_errors.py::test_kvcache_overflow_writes_nothing[cuda]" "test_torch.py::test_cuda_graph_decode_replay" \
        "test_sink.py::test_sink_forward_and_gradients[cuda-0.0-True]" "test_sink.py::test_sink_decode_splits[cuda-3]"
}
# Tests that failed once near the accuracy bound, three more times each (fresh draws): flaky.txt.
run_flaky() {
    local i
    for i in 1 2 3; do
        env -C "$T" FLASHATTN_TEST_DEVICES=cuda timeout 60 python3 -m pytest -q -p no:cacheprovider -rf \
            test_sdpa.py test_sink.py -k "runs_our_kernels or decode_splits" 2>&1 | tail -4 >> "$OUT/flaky.txt"
    done
    tail -3 "$OUT/flaky.txt" >> "$OUT/summary.txt"
}
# The decode grid from bf16 caches and from e4m3 caches (the same q in bf16), the CLI alone.
run_kvdecode() {
    step cli-decode-bf16 60 "$G/flashattn" bench --grid decode --json "$OUT/cli_decode_bf16.json"
    step cli-decode-e4m3 60 "$G/flashattn" bench --grid decode --kv-dtype e4m3 --json "$OUT/cli_decode_e4m3.json"
}
run_decode() {
    step peers-decode 60 python3 "$G/torch_baselines.py" --grid decode --backends fa2,cudnn,flashattn \
        --json "$OUT/peers_decode.json"
    step cli-decode 60 "$G/flashattn" bench --grid decode --json "$OUT/cli_decode.json"
}
# The backward before and after a change: the standard grid's forward+backward through a base CLI
# (.gpu/base/flashattn, built from the earlier commit) and this one, alternating for two rounds (base first,
# then this build first), beside cuDNN's figures from the peers' script in the same call.
# BWD_BASE names the base CLI's folder under .gpu (default base; e.g. a branch's build for main-against-branch);
# BWD_PEERS= (set, empty) leaves out the peers.
run_bwdab() {
    local base="$G/${BWD_BASE:-base}/flashattn"
    [ -x "$base" ] || return 0
    step bwd-base1 90 "$base" bench --grid standard --modes fwd_bwd --json "$OUT/bwd_base1.json"
    step bwd-new1 90 "$G/flashattn" bench --grid standard --modes fwd_bwd --json "$OUT/bwd_new1.json"
    step bwd-new2 90 "$G/flashattn" bench --grid standard --modes fwd_bwd --json "$OUT/bwd_new2.json"
    step bwd-base2 90 "$base" bench --grid standard --modes fwd_bwd --json "$OUT/bwd_base2.json"
    [ -n "${BWD_PEERS-1}" ] && step bwd-peers 150 python3 "$G/torch_baselines.py" --grid standard \
        --backends cudnn,flashattn --modes fwd_bwd --json "$OUT/bwd_peers.json"
}
# A branch's build (AB_BRANCH=NAME, tools/gpu/prepare_branch.sh): its learnable-sink tests (Rust) and its wheel's
# sink benchmark, in the background or after the steps before it.
run_branchsink() {
    local b="$G/${AB_BRANCH:?}"
    (FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-branch FLASHATTN_REQUIRE_GPU=1 timeout 200 "$b/cuda_sink" \
        --test-threads=1 > "$OUT/branch_sink.log" 2>&1; echo "$AB_BRANCH cuda_sink rc=$?" >> "$OUT/branch_sink.log")
    grep -E "test result|rc=|passed, |FAIL" "$OUT/branch_sink.log" | cut -c1-300 >> "$OUT/summary.txt"
}
run_branchsinkbench() {
    local b="$G/${AB_BRANCH:?}"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-branch "$b"/flashattn-*.whl || return 0
    step branch-sinkbench 200 env PYTHONPATH=/tmp/site-branch python3 "$G/variants_bench.py" --grid sink \
        --rounds 3 --json "$OUT/branch_sink.json"
}
# The decode point short of FA2, (8, 128k): the peers and the package on the decode grid, then the CLI's split
# counts by hand at that point (0 = the plan's choice), two rounds: gap.txt.
run_gap() {
    step peers-decode 60 python3 "$G/torch_baselines.py" --grid decode --backends fa2,flashattn \
        --json "$OUT/peers_decode.json"
    local r n
    for r in 1 2; do
        for n in 0 6 8 12 16 24 32; do
            echo "r=$r splits=$n $(timeout 60 "$G/flashattn" bench --grid decode --seqlens 128k --batch 8 \
                --num-splits "$n" --warmup 10 --reps 60 2>&1 | tail -1)" >> "$OUT/gap.txt"
        done
    done
    tail -14 "$OUT/gap.txt" >> "$OUT/summary.txt"
}
for MODE in "$@"; do
    case "$MODE" in
    final) run_final ;;
    correct) run_correct ;;
    verify) run_verify ;;
    sinkcheck) run_sinkcheck ;;
    bench) run_bench ;;
    all) run_correct; run_bench ;;
    harness) run_harness ;;
    pkgcli) run_pkgcli ;;
    oldnew) run_ab flashattn-old flashattn ;;
    sdpa) run_sdpa ;;
    grid) run_grid ;;
    newold) run_ab flashattn flashattn-old ;;
    # A branch's CLI against main's (tools/gpu/prepare_branch.sh into .gpu/NAME): AB_BRANCH=NAME, oldnew.txt.
    ab) run_ab flashattn "${AB_BRANCH:?}/flashattn" ;;
    # A branch's Rust CUDA quick sweep (AB_BRANCH=NAME) in the background, beside the steps after it, with its
    # log (branch_sweep.log) and main's Rust kernel cache (the same source compiles to the same cubins); the script waits for it at the end.
    branchsweep) (FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-rust FLASHATTN_ALLOW_SPILLS=1 \
        FLASHATTN_REQUIRE_GPU=1 FLASHATTN_SWEEP=quick timeout 300 "$G/${AB_BRANCH:?}/cuda" --test-threads=1 sweep \
        > "$OUT/branch_sweep.log" 2>&1; echo "$AB_BRANCH sweep rc=$?" >> "$OUT/branch_sweep.log") & ;;
    # The Rust CUDA quick sweep of this build (every sweep test: both paths, both dtypes, d256 both key-block forms)
    # in the background beside the steps after it (rust_sweep.log); `waitbg` waits for it before any timing.
    rustsweep) (FLASHATTN_CACHE_DIR=/tmp/flashattn-kernels-rust FLASHATTN_ALLOW_SPILLS=1 FLASHATTN_REQUIRE_GPU=1 \
        FLASHATTN_SWEEP=quick timeout 300 "$G/cuda" --test-threads=1 sweep > "$OUT/rust_sweep.log" 2>&1
        echo "cuda sweep rc=$?" >> "$OUT/rust_sweep.log") & ;;
    waitbg) wait ;;
    # memcheck and racecheck on the d256 forward with 80-key blocks (causal, GQA, partial blocks).
    bn80san)
        step bn80-memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$G/flashattn" check --device cuda \
            --dtype bf16 -d 256 -b 1 -s 777 --seqlen-k 1500 --heads 6 --heads-k 2 --causal --sm90-bn 80
        step bn80-racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 "$G/flashattn" check \
            --device cuda --dtype bf16 -d 256 -b 1 -s 300 --heads 2 --causal --sm90-bn 80 ;;
    mha) step pytest-mha 120 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rf \
        test_sdpa.py ;;
    pytest) run_pytest ;;
    decode) run_decode ;;
    memcheck) run_memcheck ;;
    flaky) run_flaky ;;
    kvdecode) run_kvdecode ;;
    splits) run_splits ;;
    repro) run_repro ;;
    quickgrid)
        step peers-quick 90 python3 "$G/torch_baselines.py" --grid quick --backends fa2,cudnn,flashattn \
            --json "$OUT/peers_standard.json"
        step cli-quick 60 "$G/flashattn" bench --grid quick --json "$OUT/cli_standard.json" ;;
    ring) step ring 120 env -C "$T" FLASHATTN_TEST_DEVICES=cuda python3 -m pytest -q -p no:cacheprovider -rsx \
        test_parallel.py ;;
    variants) step variants 200 python3 "$G/variants_bench.py" --json "$OUT/variants.json" ;;
    sinkbench) step sinkbench 200 python3 "$G/variants_bench.py" --grid sink --rounds 3 --json "$OUT/sink.json" ;;
    # Llama-style GQA (32/8 heads, d 128, 16k tokens): the peers with cuDNN's enable_gqa beside `flashattn bench`.
    gqa)
        step peers-gqa 150 python3 "$G/torch_baselines.py" --grid gqa --backends fa2,cudnn,flashattn \
            --json "$OUT/peers_gqa.json"
        step cli-gqa 90 "$G/flashattn" bench --grid gqa --json "$OUT/cli_gqa.json" ;;
    bwdab) run_bwdab ;;
    branchsink) run_branchsink ;;
    branchsinkbench) run_branchsinkbench ;;
    gap) run_gap ;;
    hf) step hf-bench 420 python3 "$G/hf_bench.py" --json "$OUT/hf_bench.json" ;;
    overhead) step overhead 60 python3 "$G/overhead.py" --json "$OUT/overhead.json" ;;
    # The package against the CLI, alternating point by point, five rounds (issue 16; about 4 minutes).
    interleaved) step interleaved 500 python3 "$G/pkg_cli_interleaved.py" --cli "$G/flashattn" --rounds 5 \
        --seqlens "${INTERLEAVED_SEQLENS:-512,1024,2048,4096,8192,16384}" --json "$OUT/interleaved.json" ;;
    esac
done
wait
[ -f "$OUT/rust_sweep.log" ] && grep -E "test result|rc=|panicked|FAILED|passed, " "$OUT/rust_sweep.log" | cut -c1-300 >> "$OUT/summary.txt"
[ -f "$OUT/branch_sweep.log" ] && grep -E "test result|rc=|panicked|FAILED" "$OUT/branch_sweep.log" | cut -c1-300 >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
