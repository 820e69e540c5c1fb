#!/usr/bin/env bash
# The library reads one family of environment variables only: the kernel cache folder (FLASHATTN_CACHE_DIR, else
# XDG_CACHE_HOME, else HOME, else the temporary folder; crates/flashattn/src/cuda/cache.rs). Every other choice is
# an argument (AttnOptions::tuning). Fails, naming the lines, on any other use of std::env under crates/flashattn/src:
# a read of another variable, a read whose name is not a literal, or an import that would hide one.
set -euo pipefail
cd "$(dirname "$0")/.."
allowed='env::var(_os)?\("(FLASHATTN_CACHE_DIR|XDG_CACHE_HOME|HOME)"\)|env::temp_dir\(\)'
uses=$(grep -rnE '\benv::|\buse std::env\b' crates/flashattn/src || true)
bad=$(printf '%s\n' "$uses" | grep -vE "$allowed" | grep -v '^$' || true)
if [ -n "$bad" ]; then
    echo "crates/flashattn/src reads environment variables other than the kernel cache folder's:" >&2
    printf '%s\n' "$bad" >&2
    exit 1
fi
echo "environment reads of the library: $(printf '%s\n' "$uses" | grep -oE '"[A-Z_]+"' | sort -u | tr '\n' ' ')(cache folder only)"
