#!/usr/bin/env bash
# Several GPU machines: run this on EVERY host with the same flags (e.g. via pdsh / srun).
#   COORD=host0:1234 NUM_HOSTS=2 HOST_ID=<0..NUM_HOSTS-1> bash train/scripts/multi_host_gpu.sh
# jax.distributed.initialize() reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# (under SLURM it needs none of them: plain `srun python -m train --distributed ...` works).
# WORKDIR and the data must be on a file system all hosts share; host 0 writes the outputs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export JAX_COORDINATOR_ADDRESS=${COORD:?set COORD=host:port of host 0}
export JAX_NUM_PROCESSES=${NUM_HOSTS:?} JAX_PROCESS_ID=${HOST_ID:?}
WORKDIR=${WORKDIR:?set WORKDIR to a shared directory}
exec python -m train --preset cifar10 --distributed --workdir "$WORKDIR" "$@"
