#!/usr/bin/env bash
# Builds what a device call needs, here (no GPU, no CUDA toolkit), into the ignored folder .gpu/ of the
# repository: the stripped `flashattn` CLI, the CUDA test binaries (`cuda`, `cuda_kvcache`, `cuda_nonfinite`,
# `cuda_sink`),
# the peers' script `torch_baselines.py` from the shared folder beside the checkout (the shared folder does not
# travel to the device machine), and the device-side scripts of tools/gpu/. Then one device call runs, e.g.
#   bash .gpu/experiments.sh        (with `.gpu` carried; see docs/notes/cuda-sm90.md for what it answers)
# Usage: tools/gpu/prepare.sh [SHARED_DIR]   (default: ../shared relative to the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SHARED=${1:-$ROOT/../shared}
cd "$ROOT"
EXCLUDE=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
grep -qxF '/.gpu/' "$EXCLUDE" 2>/dev/null || { mkdir -p "$(dirname "$EXCLUDE")"; echo '/.gpu/' >> "$EXCLUDE"; }
rm -rf .gpu && mkdir -p .gpu
cargo build --release --locked -p flashattn-cli
cp target/release/flashattn .gpu/flashattn
# The test binaries' paths, from cargo's JSON messages.
cargo test --release --locked -p flashattn --test cuda --test cuda_kvcache --test cuda_nonfinite --test cuda_sink --no-run --message-format=json \
    | python3 tools/gpu/copy_exes.py .gpu cuda cuda_kvcache cuda_nonfinite cuda_sink
strip .gpu/flashattn .gpu/cuda .gpu/cuda_kvcache .gpu/cuda_nonfinite .gpu/cuda_sink
cp "$SHARED/bench/torch_baselines.py" .gpu/
cp tools/gpu/*.sh tools/gpu/*.py .gpu/
# This checkout's Python tests, for a device call made from another checkout (python.sh with PYTESTS=.gpu/tests).
cp -r python/tests .gpu/tests
# The Python package as a wheel (abi3, runs on the device machine as it is).
PY=${PYTHON:-python3}
"$PY" -m maturin --version >/dev/null 2>&1 || "$PY" -m pip install -q --disable-pip-version-check 'maturin>=1.5,<2'
"$PY" -m maturin build --release --locked -o .gpu
ls -la .gpu
du -sh .gpu
