"""Pointwise conv forward+backward with bfloat16 products: jaxdsc (AMX or AVX512-BF16) against PyTorch autocast.

At the pointwise shapes of the ``cifar10-cpu`` DSCNet (batch 128), interleaved in one process
(``_harness.time_interleaved``, medians of the rounds), milliseconds per call of
``grad(sum(tanh(conv(x))))`` with respect to input, kernel and bias:

* ``jaxdsc f32``: ``pointwise_conv`` (native float32 GEMM);
* ``jaxdsc bf16``: the same with ``precision=lax.DotAlgorithmPreset.BF16_BF16_F32`` (AMX or AVX512-BF16
  kernels, whichever the CPU has; the header line names it);
* ``torch f32`` / ``torch bf16``: a 1x1 ``conv2d`` (channels_last), plain or under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (oneDNN, AMX or AVX512-BF16 where the CPU has them).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1 \\
        python benchmarks/pw_bf16.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _harness import env_info, time_interleaved
from jax import lax

from jaxdsc.ops import pointwise_conv
from jaxdsc.ops.native_pointwise import bf16_isa

# (spatial, C_in, C_out) of the cifar10-cpu net's pointwise convs at 32x32 input.
SHAPES = [(16, 32, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256), (8, 256, 384), (8, 384, 384)]
BATCH = 128


def _jax(x, w, b, precision):
    loss = lambda x, w, b: jnp.sum(jnp.tanh(pointwise_conv(x, w, b, precision=precision)))  # noqa: E731
    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(f(x, w, b))


def _torch(x, w, b, autocast):
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    xt.requires_grad_(True)
    wt = torch.from_numpy(np.array(w)).T.contiguous()[:, :, None, None].requires_grad_(True)
    bt = torch.from_numpy(np.array(b)).requires_grad_(True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = torch.nn.functional.conv2d(xt, wt, bt)
        torch.tanh(y.float()).sum().backward()
        xt.grad = wt.grad = bt.grad = None

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if bf16_isa() == "none":
        print("no AMX or AVX512-BF16 here: the 'jaxdsc bf16' column would be the float32 kernels", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    env = env_info()
    print(f"torch {env['torch']}, jax {env['jax']}, {env['cpus']} CPUs, GLIBC_TUNABLES {env['GLIBC_TUNABLES']}, "
          f"cpu {env['cpu']}, bf16 kernels on {bf16_isa()}")
    print("| shape (N=128) | jaxdsc f32 | jaxdsc bf16 | torch f32 | torch bf16 | jaxdsc bf16 vs torch bf16 |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for s, k, n in SHAPES:
        x = jnp.asarray(rng.standard_normal((BATCH, s, s, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
        b = jnp.zeros((n,), jnp.float32)
        fns = {"jaxdsc f32": _jax(x, w, b, None),
               "jaxdsc bf16": _jax(x, w, b, lax.DotAlgorithmPreset.BF16_BF16_F32),
               "torch f32": _torch(x, w, b, False), "torch bf16": _torch(x, w, b, True)}
        ms = {name: t.median_ms for name, t in time_interleaved(fns, rounds=args.rounds).items()}
        cells = " | ".join(f"{ms[name]:.2f}" for name in fns)
        print(f"| {s}x{s}, {k}->{n} | {cells} | {ms['torch bf16'] / ms['jaxdsc bf16']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
