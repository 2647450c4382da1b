"""Pointwise GEMM A/B: the native GEMM, XLA's GEMM and PyTorch's 1x1 conv (channels_last) in turn.

A quick check of the pointwise forward alone (no rotation between candidates, each
timed in its own block, twice): the figures behind "spin-waiting caller" in
BENCHMARKS.md. The interleaved layer benchmark (``layers.py``) is the reference.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1 \\
        python benchmarks/pw_ab.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import torch

from jaxdsc.ops import pointwise_conv

SHAPES = [(32768, 64, 64), (16384, 256, 256), (4096, 64, 64), (131072, 64, 64)]  # (M, K, N)


def _median_ms(f, n: int, rounds: int = 7) -> float:
    f(), f()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t) / n)
    return float(np.median(times)) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = jax.numpy.asarray(rng.standard_normal((m, k)), jax.numpy.float32)
        w = jax.numpy.asarray(rng.standard_normal((k, n)), jax.numpy.float32)
        b = jax.numpy.zeros((n,), jax.numpy.float32)
        native = jax.jit(lambda x, w, b: pointwise_conv(x, w, b, impl="native"))
        xla = jax.jit(lambda x, w, b: pointwise_conv(x, w, b, impl="xla"))
        tx = torch.randn(m // 256, k, 16, 16).to(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(k, n, 1).to(memory_format=torch.channels_last)

        def run_torch(conv=conv, tx=tx) -> None:
            with torch.no_grad():
                conv(tx)

        calls = max(50, int(3e10 / (m * k * n)))
        args = (x, w, b)
        cands = {"native": lambda f=native, a=args: f(*a).block_until_ready(),
                 "xla": lambda f=xla, a=args: f(*a).block_until_ready(), "torch_cl": run_torch}
        res = {f"{name}{i}": _median_ms(f, calls) for i in (1, 2) for name, f in cands.items()}
        flops = 2 * m * k * n
        print(f"M={m} K={k} N={n}: " + ", ".join(f"{name} {ms:.3f} ms ({flops / ms / 1e6:.0f} GFLOP/s)"
                                                 for name, ms in res.items()), flush=True)


if __name__ == "__main__":
    main()
