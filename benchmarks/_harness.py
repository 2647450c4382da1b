"""Timing and roofline helpers shared by the benchmark scripts (not a test module).

Method (the CPU is a noisy shared 2-vCPU VM): every candidate is warmed up,
then timed in ``rounds`` rounds; in each round every candidate runs a block of
back-to-back synchronous calls lasting at least ``block_s`` seconds, in an
order rotated from round to round so slow drifts hit all candidates alike, with a
``gap_s`` pause before each block so no candidate pays for the previous one's
still-spinning threads.
Report medians over rounds and ratios of medians from the same process.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    calls_per_block: int
    faults_per_call: float
    samples_ms: list[float]


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int = 7, block_s: float = 0.25, warmup: int = 2,
    gap_s: float = 0.05,
) -> dict[str, Timing]:
    """Time zero-argument synchronous callables, interleaved; see the module docstring."""
    names = list(fns)
    calls = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t0 = time.perf_counter()
        fns[name]()
        calls[name] = max(1, min(1000, int(block_s / max(time.perf_counter() - t0, 1e-6))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    faults = dict.fromkeys(names, 0)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = fns[name], calls[name]
            # A pause between blocks: PyTorch's OpenMP threads keep spinning for a while after its
            # last call and took CPU from the next block (pw fwd N128 16x16 64->64: jaxdsc 0.65 ms
            # right after a torch block, 0.58-0.59 ms after a 50 ms pause; torch 0.59-0.64 either way).
            time.sleep(gap_s)
            pf0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - pf0
    return {
        n: Timing(
            median_ms=statistics.median(samples[n]),
            min_ms=min(samples[n]),
            calls_per_block=calls[n],
            faults_per_call=faults[n] / (rounds * calls[n]),
            samples_ms=[round(v, 4) for v in samples[n]],
        )
        for n in names
    }


def stream_reference(nbytes: float, pattern: str = "inplace") -> Callable[[], None]:
    """A zero-argument call that moves ``nbytes`` (read + written) through memory.

    ``inplace``: a jitted ``x * 2`` on one donated float32 buffer of ``nbytes / 2``
    bytes, the roofline probe's fastest pattern. ``copy``: ``x * 2`` from one
    buffer into another (donated, so no fresh pages), each ``nbytes / 2``: the
    access pattern of a conv forward (read x, write a separate y); on this VM it
    streams at about half the in-place rate. Timed beside a kernel that moves
    ``nbytes``, either gives that kernel's bound under the same conditions (the
    VM's bandwidth drifts 46-115 GB/s between runs). Buffers under the
    last-level cache stream partly from cache: a tougher bound.
    """
    if pattern not in ("inplace", "copy"):
        raise ValueError(f"pattern must be 'inplace' or 'copy', got {pattern!r}")
    size = max(1, int(nbytes // 8))
    state = {"y": jnp.ones(size, jnp.float32)}
    if pattern == "inplace":
        step = jax.jit(lambda y: y * 2.0, donate_argnums=0)
        args = ()
    else:
        step = jax.jit(lambda y, x: x * 2.0, donate_argnums=0)
        args = (jnp.ones(size, jnp.float32),)

    def call() -> None:
        state["y"] = step(state["y"], *args)
        state["y"].block_until_ready()

    return call


def roofline_probe(device: str = "cpu", rounds: int = 5) -> dict[str, float]:
    """Measured streaming bandwidth (GB/s, bytes read + written) and f32 matmul peak (GFLOP/s).

    Bandwidth: torch ``copy_`` between two preallocated 256 MiB tensors and a
    jitted in-place ``x * 2`` with the buffer donated (no fresh-page faults),
    best framework taken. Peak: ``jnp.dot`` and ``torch.mm`` of 4096^2 float32.
    """
    import torch

    n = 64 << 20  # floats: 256 MiB
    src = torch.ones(n, device=device)
    dst = torch.empty(n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def torch_copy():
        dst.copy_(src)
        sync()

    jax_inplace = stream_reference(2 * n * 4, "inplace")

    m = 4096
    a_j = jnp.ones((m, m), jnp.float32)
    a_t = torch.ones((m, m), device=device)
    dot = jax.jit(jnp.dot)

    def jax_mm():
        dot(a_j, a_j).block_until_ready()

    def torch_mm():
        torch.mm(a_t, a_t)
        sync()

    t = time_interleaved(
        {
            "torch_copy": torch_copy,
            "jax_inplace": jax_inplace,
            "jax_mm": jax_mm,
            "torch_mm": torch_mm,
        },
        rounds=rounds,
        block_s=0.3,
    )
    gbs = {k: 2 * n * 4 / (t[k].median_ms * 1e-3) / 1e9 for k in ("torch_copy", "jax_inplace")}
    gfs = {k: 2 * m**3 / (t[k].median_ms * 1e-3) / 1e9 for k in ("jax_mm", "torch_mm")}
    return {
        **{f"{k}_GBps": v for k, v in gbs.items()},
        **{f"{k}_GFLOPps": v for k, v in gfs.items()},
        "bandwidth_GBps": max(gbs.values()),
        "peak_GFLOPps": max(gfs.values()),
    }


def env_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset: default malloc)"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        # Other processes on the 2 shared vCPUs distort absolute times (and
        # hit PyTorch's spinning OpenMP threads harder): record the load.
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    try:
        from jaxdsc.ops import native

        info["native_isa"] = (
            native.isa() if native.available() else f"unavailable: {native.unavailable_reason()}"
        )
    except ImportError:
        pass
    return info


def write_results(path: str, args: object, rows: list[dict]) -> None:
    """``{"args", "env", "rows"}`` as JSON at ``path`` (the benchmarks' result-file layout)."""
    import json
    from pathlib import Path

    out = {"args": vars(args), "env": env_info(), "rows": rows}
    Path(path).write_text(json.dumps(out, indent=1))
