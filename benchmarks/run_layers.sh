#!/usr/bin/env bash
# CPU layer benchmark of issue 5 (see BENCHMARKS.md, "Layers (`nopf2`)").
# Usage: benchmarks/run_layers.sh [nopf2|default] [extra args for benchmarks/layers.py]
#   nopf2   (default): glibc malloc never returns big buffers to the OS, so
#           neither framework pays page faults for fresh outputs every call;
#   default: plain glibc malloc, what a user gets out of the box.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-nopf2}"
shift || true
case "${mode}" in
  nopf2) export GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1 ;;
  default) unset GLIBC_TUNABLES ;;
  *) echo "unknown allocator mode ${mode} (nopf2|default)" >&2; exit 2 ;;
esac
mkdir -p benchmarks/results
python benchmarks/layers.py --json "benchmarks/results/layers_${mode}.json" --markdown "benchmarks/results/layers_${mode}.md" "$@"
