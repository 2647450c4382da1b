#!/usr/bin/env bash
# Data-parallel training on every GPU of one machine: one process, one jitted SPMD program,
# the batch sharded over a 1-D device mesh, parameters replicated (no launcher needed).
# --batch-size is the GLOBAL batch; it must be a multiple of the GPU count. Scale --lr with it
# (linear rule from the preset's 512 / 0.4).
#   bash train/scripts/multi_gpu.sh --batch-size 1024 --lr 0.8
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:-runs/cifar10-multigpu}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxdsc/xla}
exec python -m train --preset cifar10 --workdir "$WORKDIR" --export-torch "$WORKDIR/model.safetensors" "$@"
