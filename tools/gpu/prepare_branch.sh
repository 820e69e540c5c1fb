#!/usr/bin/env bash
# Builds the CLI and CUDA test binaries of another checkout (a branch's worktree) into .gpu/NAME/ of this one,
# after tools/gpu/prepare.sh, so that one device call runs a branch beside main (before/after, or a kernel
# change not yet on main), with its Python wheel and python/tests. Usage: tools/gpu/prepare_branch.sh WORKTREE NAME TEST...
#   tools/gpu/prepare_branch.sh ../wt-sink sink cuda_sink cuda cuda_kvcache
# The branch builds into its own target folder. Do not point CARGO_TARGET_DIR at another checkout's: cargo names a
# workspace member's artifacts by its path inside the workspace, so the two checkouts' binaries share names there
# and a build seen as fresh reports the other checkout's binary.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WT=$(cd "$1" && pwd)
NAME=$2
shift 2
DEST=$ROOT/.gpu/$NAME
rm -rf "$DEST" && mkdir -p "$DEST"
cd "$WT"
cargo build --release --locked -p flashattn-cli --message-format=json \
    | python3 "$ROOT/tools/gpu/copy_exes.py" "$DEST" flashattn
args=()
for t in "$@"; do args+=(--test "$t"); done
cargo test --release --locked -p flashattn "${args[@]}" --no-run --message-format=json \
    | python3 "$ROOT/tools/gpu/copy_exes.py" "$DEST" "$@"
strip "$DEST"/*
PY=${PYTHON:-python3}
"$PY" -m maturin build --release --locked -o "$DEST"
cp -r python/tests "$DEST/tests"
ls -la "$DEST"
