#!/usr/bin/env bash
# TPU pod slice (e.g. v4-32): the same command on every worker. On TPU VMs
# jax.distributed.initialize() detects coordinator, process count and id itself; --distributed turns it on.
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
#     "cd jaxdsc && pip install -e '.[train]' 'jax[tpu]' && WORKDIR=gs-fuse-or-nfs/run bash train/scripts/tpu_pod.sh"
# The data set (180 MB) is read by every host and held in device memory; WORKDIR must be a
# shared file system (NFS, or a GCS bucket mounted with gcsfuse). Global batch = --batch-size.
# DRY_RUN=1 prints the command and checks its flags (python -m train ... --show-config) without training.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:?set WORKDIR to a directory all workers share}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/xla-cache}
CMD=(python -m train --preset cifar10 --distributed --batch-size 1024 --lr 0.8 --workdir "$WORKDIR" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${CMD[*]}"
  exec "${CMD[@]}" --show-config
fi
exec "${CMD[@]}"
