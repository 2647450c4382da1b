"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` with explicit arguments.

A run is multi-process when ``--distributed`` (or ``JAXDSC_DISTRIBUTED=1``) is
given, when any of ``--coordinator-address`` / ``--num-processes`` /
``--process-id`` is, or when ``JAX_COORDINATOR_ADDRESS`` is set. Each of the
three values comes from its flag, else from ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (JAX 0.10 reads only the first
itself), else JAX detects it (SLURM, Open MPI, TPU VMs, ...): with none of
them, ``jax.distributed.initialize()`` is called without arguments.

This must run before anything starts a JAX backend: ``import train`` (and
``jaxdsc``) start none; the trainer calls :func:`maybe_initialize` first.
CPU processes exchange data with JAX's CPU collectives
(``jax_cpu_collectives_implementation``, ``gloo`` by default in JAX 0.10).
See docs/multi-host.md for the commands.
"""

from __future__ import annotations

import os
from typing import Any

from train.config import ConfigError, RunConfig

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def requested(run: RunConfig, environ: dict[str, str] | None = None) -> bool:
    """Whether this run is multi-process (see the module doc)."""
    env = os.environ if environ is None else environ
    return (run.distributed or env.get("JAXDSC_DISTRIBUTED") == "1" or bool(run.coordinator_address)
            or run.num_processes > 0 or run.process_id >= 0 or bool(env.get(ENV["coordinator_address"])))


def _env_int(env: dict[str, str] | Any, name: str, minimum: int) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"${name}={text!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"${name}={value} must be >= {minimum}")
    return value


def initialize_args(run: RunConfig, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments for ``jax.distributed.initialize``: flags, else environment; unset ones left out.

    An empty dict means "let JAX auto-detect everything" (SLURM, TPU VMs).
    """
    env = os.environ if environ is None else environ
    args: dict[str, Any] = {
        "coordinator_address": run.coordinator_address or env.get(ENV["coordinator_address"], "").strip() or None,
        "num_processes": run.num_processes if run.num_processes > 0 else _env_int(env, ENV["num_processes"], 1),
        "process_id": run.process_id if run.process_id >= 0 else _env_int(env, ENV["process_id"], 0),
    }
    n, i = args["num_processes"], args["process_id"]
    if n is not None and i is not None and not i < n:
        raise ConfigError(f"process id {i} (--process-id / ${ENV['process_id']}) must be below the process count "
                          f"{n} (--num-processes / ${ENV['num_processes']})")
    return {k: v for k, v in args.items() if v is not None}


def maybe_initialize(run: RunConfig) -> dict[str, Any] | None:
    """Call ``jax.distributed.initialize`` when the run is multi-process; returns the arguments passed."""
    if not requested(run):
        return None
    import jax

    args = initialize_args(run)
    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError) as e:  # JAX could not detect what was not given
        given = ", ".join(f"{k}={v}" for k, v in args.items()) or "none"
        raise ConfigError(
            f"jax.distributed.initialize failed ({' '.join(str(e).split())}); given: {given}. Outside SLURM / "
            "TPU VMs pass --coordinator-address HOST:PORT --num-processes N --process-id I (or set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)") from None
    return args
