#!/usr/bin/env bash
# Every test of the project, in one command (the README's test command; CI runs it too):
#   1. the Rust workspace (CPU sweep, CLI, KV cache, errors; GPU tests skip visibly without a GPU);
#   2. the Python package: built into a wheel, installed with PyTorch into a virtual environment (.venv, or
#      $FLASHATTN_VENV), and its pytest suite run on CPU tensors (and on CUDA tensors where a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Rust tests"
cargo test --workspace --release --locked

echo "== Python package"
VENV=${FLASHATTN_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check 'torch>=2.4' pytest numpy 'maturin>=1.5,<2' 'transformers>=5,<6'
rm -rf target/wheels
"$VENV/bin/maturin" build --release --locked -o target/wheels
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall target/wheels/flashattn-*.whl
# Run from the tests' folder so the installed package, not the source tree, is imported.
(cd python/tests && "$VENV/bin/python" -m pytest -q -p no:cacheprovider .)
