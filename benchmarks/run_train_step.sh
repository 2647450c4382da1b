#!/usr/bin/env bash
# Whole-training-step benchmark of issue 5 (see benchmarks/train_step.py and BENCHMARKS.md,
# "Whole training step").
# Usage: benchmarks/run_train_step.sh [nopf2|default|both] [extra args for benchmarks/train_step.py]
#   nopf2   (default): glibc malloc keeps big buffers (no fresh-page faults on every step), as
#           benchmarks/run_layers.sh;
#   default: plain glibc malloc, what a user gets out of the box;
#   both:    default, then nopf2, and benchmarks/results/train_step.{json,md} holding both.
# Writes benchmarks/results/train_step_<mode>.{json,md}; the load average is recorded in both.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-nopf2}"
shift || true
NOPF2=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1
run() {
  local m="$1"
  shift
  case "${m}" in
    nopf2) export GLIBC_TUNABLES="${NOPF2}" ;;
    default) unset GLIBC_TUNABLES ;;
    *) echo "unknown allocator mode ${m} (nopf2|default|both)" >&2; exit 2 ;;
  esac
  echo "== ${m}: $(uptime)"
  python benchmarks/train_step.py --json "benchmarks/results/train_step_${m}.json" \
    --markdown "benchmarks/results/train_step_${m}.md" "$@"
}
mkdir -p benchmarks/results
if [ "${mode}" = both ]; then
  run default "$@"
  run nopf2 "$@"
  python - <<'PY'
import json
from pathlib import Path

res = Path("benchmarks/results")
modes = ("nopf2", "default")
json_out = {m: json.loads((res / f"train_step_{m}.json").read_text()) for m in modes}
(res / "train_step.json").write_text(json.dumps(json_out, indent=1))
titles = {"nopf2": "GLIBC_TUNABLES nopf2 (no fresh-page faults)", "default": "default glibc malloc"}
md = "".join(f"### {titles[m]}\n\n" + (res / f"train_step_{m}.md").read_text() + "\n" for m in modes)
(res / "train_step.md").write_text(md)
print("wrote benchmarks/results/train_step.{json,md}")
PY
else
  run "${mode}" "$@"
fi
