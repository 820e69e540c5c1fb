#!/usr/bin/env bash
# Bounded fuzzing for CI: builds the fuzz targets and runs each for a fixed time from the stored seeds
# (fuzz/seeds/<target>/), one job, failing on the first crash (libFuzzer exits non-zero and this script
# with it). The working corpus is a scratch copy: the seeds in the repository are never modified.
#
#   bash fuzz/ci.sh                       # the CI budget (90 s of fuzzing in all)
#   FUZZ_SECONDS_SCALE=10 bash fuzz/ci.sh  # ten times longer
#
# Needs only a stable toolchain (RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags) and crates.io.
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1
# The CPU backend on one thread, one fuzzing job: CI machines are small and shared.
export RAYON_NUM_THREADS=1

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# target:seconds:max_len
TARGETS="validate:40:4096 propagate:30:512 cli_run:20:8192"
SCALE="${FUZZ_SECONDS_SCALE:-1}"

cargo fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export FLASHATTN_FUZZ_DIR="$scratch"   # cli_run's input and output files
for t in $TARGETS; do
  IFS=: read -r name secs max_len <<<"$t"
  secs=$((secs * SCALE))
  corpus="$scratch/$name"
  mkdir -p "$corpus"
  cp seeds/"$name"/* "$corpus"/
  echo "-- fuzz $name for ${secs}s ($(ls seeds/"$name" | wc -l) seeds)"
  extra=()
  # `run` prints a line or two per input: keep them out of the log (libFuzzer's own report still shows).
  [ "$name" = cli_run ] && extra=(-close_fd_mask=3)
  # cargo-fuzz saves a crashing input under fuzz/artifacts/<target>/ (replay: cargo fuzz run <target> <file>).
  log="$scratch/$name.log"
  rc=0
  cargo fuzz run "$name" "$corpus" -- -max_total_time="$secs" -max_len="$max_len" -print_final_stats=1 \
    "${extra[@]}" >"$log" 2>&1 || rc=$?
  grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::number_of_executed_units|stat::peak_rss)' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log"
    echo "FAIL: fuzz target $name exited with $rc; the input is in fuzz/artifacts/$name/"
    exit 1
  fi
done
echo "fuzz: no crash"
