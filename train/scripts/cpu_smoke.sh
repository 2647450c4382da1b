#!/usr/bin/env bash
# CPU smoke test: generates a tiny CIFAR-10 look-alike in the official binary layout and trains
# the `tiny` preset on it (about a minute on 2 cores). Add e.g. --export-torch /tmp/m.safetensors.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/tmp/jaxdsc-smoke-data}
python -c "from train.testing import write_cifar10; write_cifar10('$DATA', 512, 256)"
exec python -m train --preset tiny --data-dir "$DATA" --workdir "${WORKDIR:-/tmp/jaxdsc-smoke}" "$@"
