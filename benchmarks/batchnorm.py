"""Train-mode BatchNorm + ReLU: native kernels vs XLA vs PyTorch, one process, interleaved.

The activations of the CIFAR model's blocks (batch 128, w32: 32x32x32, 16x16x64,
8x8x128), forward and forward+backward (gradients w.r.t. x, scale and bias),
``jaxdsc.ops.batchnorm.batch_norm_act_train(relu=True)`` with ``impl="native"``
and ``impl="xla"`` against ``torch.nn.BatchNorm2d`` + ``relu`` (NCHW and
channels_last). Effective GB/s count the fewest passes a kernel can make:
forward 2 reads + 1 write of x's size, forward+backward 6 reads + 2 writes.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1 \\
        python benchmarks/batchnorm.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _harness import time_interleaved

from jaxdsc.ops.batchnorm import batch_norm_act_train

SHAPES = [(128, 32, 32, 32), (128, 16, 16, 64), (128, 8, 8, 128), (128, 32, 32, 40), (128, 16, 16, 80)]  # NHWC (w32; two of w40)
PASSES = {"fwd": 3, "fwdbwd": 8}


def jax_fn(impl: str, mode: str):
    def fwd(x, s, b):
        return batch_norm_act_train(x, s, b, 1e-5, relu=True, impl=impl)[0]

    if mode == "fwd":
        return jax.jit(fwd)

    def fwdbwd(x, s, b, g):
        y, vjp = jax.vjp(fwd, x, s, b)
        return y, vjp(g)

    return jax.jit(fwdbwd)


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    print("| shape (NHWC) | mode | native ms | xla ms | torch NCHW ms | torch CL ms "
          "| native / xla | native / best torch | native GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        c = shape[-1]
        xj, sj, bj, gj = jnp.asarray(x), jnp.ones(c), jnp.zeros(c), jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for mode in PASSES:
            fns = {}
            for impl in ("native", "xla"):
                f = jax_fn(impl, mode)
                args = (xj, sj, bj) if mode == "fwd" else (xj, sj, bj, gj)
                fns[impl] = lambda f=f, args=args: jax.block_until_ready(f(*args))
            for layout, fmt in (("torch_nchw", torch.contiguous_format), ("torch_cl", torch.channels_last)):
                bn = torch.nn.BatchNorm2d(c).train()
                tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
                if mode == "fwd":
                    def call(bn=bn, tx=tx):
                        with torch.no_grad():
                            torch.relu(bn(tx))
                else:
                    tx = tx.clone().requires_grad_(True)
                    tg = torch.from_numpy(np.array(gj)).permute(0, 3, 1, 2).contiguous(memory_format=fmt)

                    def call(bn=bn, tx=tx, tg=tg):
                        y = torch.relu(bn(tx))
                        torch.autograd.grad(y, [tx, bn.weight, bn.bias], tg)
                fns[layout] = call
            t = {k: v.median_ms for k, v in time_interleaved(fns, rounds=7, block_s=0.25).items()}
            best = min(t["torch_nchw"], t["torch_cl"])
            gbs = PASSES[mode] * x.nbytes / (t["native"] * 1e6)
            print(f"| {shape} | {mode} | {t['native']:.3f} | {t['xla']:.3f} | {t['torch_nchw']:.3f} | "
                  f"{t['torch_cl']:.3f} | **{t['native'] / t['xla']:.2f}** | {t['native'] / best:.2f} | "
                  f"{gbs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
