#!/usr/bin/env bash
# Train on one GPU (or CPU). Rerunning the same command resumes from WORKDIR's newest checkpoint.
#   pip install -U "jax[cuda12]" && pip install -e ".[torch,train]"
#   bash train/scripts/single_gpu.sh [extra flags, e.g. --epochs 60]
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:-runs/cifar10-gpu}
# Restarts skip XLA compilation; 0.9 of GPU memory for XLA's allocator is JAX's default, stated here.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxdsc/xla}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
exec python -m train --preset cifar10 --workdir "$WORKDIR" --export-torch "$WORKDIR/model.safetensors" "$@"
