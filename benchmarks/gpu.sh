#!/usr/bin/env bash
# Layer benchmark of issue 5 on a CUDA machine: jaxdsc (impl="auto" = XLA/cuDNN
# on GPU, plus the forced pure-JAX "shift" path) vs PyTorch NCHW/channels_last
# vs plain flax.nnx.Conv, forward and forward+backward, same shapes as on CPU.
#
# Not yet run on a GPU (no task so far was lent one); DEVICE=cpu runs the same
# steps on CPU, and tests/test_benchmarks.py runs it that way.
#
# Usage: benchmarks/gpu.sh [extra args for benchmarks/layers.py]
# Env:   DEVICE      cuda (default) or cpu (a dry run of this script's steps);
#        INSTALL     auto (default): use the CUDA JAX and PyTorch already installed
#                    when both see a GPU (offline machines: nothing is fetched),
#                    else install them; always: install them; never: install nothing;
#        TORCH_INDEX PyTorch wheel index for INSTALL (default CUDA 12.8 wheels);
#        JAX_EXTRA   jax extra for INSTALL (default cuda12);
#        OUT         results prefix (default benchmarks/results/gpu_layers).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cuda}"
INSTALL="${INSTALL:-auto}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
JAX_EXTRA="${JAX_EXTRA:-cuda12}"
OUT="${OUT:-benchmarks/results/${DEVICE/cuda/gpu}_layers}"
PY="${PYTHON:-python3}"

case "${DEVICE}" in cuda | cpu) ;; *) echo "DEVICE must be cuda or cpu, got '${DEVICE}'" >&2; exit 2 ;; esac
case "${INSTALL}" in auto | always | never) ;; *) echo "INSTALL must be auto, always or never, got '${INSTALL}'" >&2; exit 2 ;; esac

# Prints the versions and exits 0 when JAX and PyTorch both see the wanted device.
check_stack() {
  "${PY}" - "${DEVICE}" <<'PY'
import sys
import jax, torch
want = sys.argv[1]
if want == "cuda" and jax.default_backend() != "gpu":
    sys.exit(f"JAX sees no GPU: {jax.devices()}")
if want == "cuda" and not torch.cuda.is_available():
    sys.exit("PyTorch sees no GPU")
name = torch.cuda.get_device_name() if want == "cuda" else "cpu"
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, name)
PY
}

[[ "${DEVICE}" == cuda ]] && nvidia-smi
need_stack=false
[[ "${INSTALL}" == always ]] && need_stack=true
if [[ "${INSTALL}" == auto && "${DEVICE}" == cuda ]] && ! check_stack >/dev/null 2>&1; then need_stack=true; fi
if [[ "${need_stack}" == true ]]; then
  # CUDA builds first, so the project's own requirements do not pull CPU wheels.
  "${PY}" -m pip install "jax[${JAX_EXTRA}]"
  "${PY}" -m pip install torch --index-url "${TORCH_INDEX}"
fi
if [[ "${INSTALL}" != never ]]; then
  # The project only: its requirements (flax, optax, safetensors) are in the
  # GPU image; --no-build-isolation needs no index either.
  "${PY}" -m pip install -q --no-deps --no-build-isolation -e . ||
    { echo "installing jaxdsc failed" >&2; exit 1; }
fi

check_stack

mkdir -p "$(dirname "${OUT}")"
# No preallocation: JAX and PyTorch share the GPU in one process.
# Kernel times are microseconds, so use more rounds and let blocks be short.
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  "${PY}" benchmarks/layers.py --device "${DEVICE}" --threads 1 --rounds 11 --block-s 0.2 \
  --json "${OUT}.json" --markdown "${OUT}.md" "$@"
echo "wrote ${OUT}.json and ${OUT}.md"
