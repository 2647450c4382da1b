#!/usr/bin/env bash
# Several GPU machines: run this on EVERY host with the same flags (e.g. via pdsh), HOST_ID differing.
#   COORD=host0:1234 NUM_HOSTS=2 HOST_ID=<0..NUM_HOSTS-1> WORKDIR=/shared/run bash train/scripts/multi_host_gpu.sh
# The values go to jax.distributed.initialize as flags (JAX 0.10 reads only JAX_COORDINATOR_ADDRESS
# from the environment). Under SLURM none is needed: `srun python -m train --distributed ...`.
# WORKDIR and the data must be on a file system all hosts share; process 0 writes the outputs.
# DRY_RUN=1 prints the command and checks its flags (python -m train ... --show-config) without training.
set -euo pipefail
cd "$(dirname "$0")/../.."
COORD=${COORD:?set COORD=host:port of host 0}
NUM_HOSTS=${NUM_HOSTS:?set NUM_HOSTS to the number of hosts}
HOST_ID=${HOST_ID:?set HOST_ID to this host index, 0..NUM_HOSTS-1}
WORKDIR=${WORKDIR:?set WORKDIR to a shared directory}
CMD=(python -m train --preset cifar10 --distributed --coordinator-address "$COORD" --num-processes "$NUM_HOSTS"
     --process-id "$HOST_ID" --workdir "$WORKDIR" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${CMD[*]}"
  exec "${CMD[@]}" --show-config
fi
exec "${CMD[@]}"
