#!/usr/bin/env bash
# Layer benchmark of issue 5 on a CUDA machine: jaxdsc (impl="auto" = XLA/cuDNN
# on GPU, plus the forced pure-JAX "shift" path) vs PyTorch NCHW/channels_last
# vs plain flax.nnx.Conv, forward and forward+backward, same shapes as on CPU.
#
# UNTESTED: written without access to a GPU (issue 5 session); check the
# versions below against the machine's driver before trusting it.
#
# Usage: benchmarks/gpu.sh [extra args for benchmarks/layers.py]
# Env:   TORCH_INDEX (default CUDA 12.8 wheels), JAX_EXTRA (default cuda12),
#        OUT (default benchmarks/results/gpu_layers), SKIP_INSTALL=1 to reuse the env.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
JAX_EXTRA="${JAX_EXTRA:-cuda12}"
OUT="${OUT:-benchmarks/results/gpu_layers}"

nvidia-smi
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  python -m pip install --upgrade pip
  # CUDA builds first, so the project's own requirements do not pull CPU wheels.
  python -m pip install "jax[${JAX_EXTRA}]"
  python -m pip install torch --index-url "${TORCH_INDEX}"
  python -m pip install -e ".[torch,dev]"
fi

python - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"JAX sees no GPU: {jax.devices()}"
assert torch.cuda.is_available(), "PyTorch sees no GPU"
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.get_device_name())
PY

mkdir -p "$(dirname "${OUT}")"
# No preallocation: JAX and PyTorch share the GPU in one process.
# Kernel times are microseconds, so use more rounds and let blocks be short.
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  python benchmarks/layers.py --device cuda --threads 1 --rounds 11 --block-s 0.2 \
  --json "${OUT}.json" --markdown "${OUT}.md" "$@"
echo "wrote ${OUT}.json and ${OUT}.md"
