"""Dense (groups=1) conv A/B: jaxdsc's implementations against PyTorch's conv, interleaved.

The convs behind the two rows below PyTorch before issue 15/17's dense kernel:
xception41's stem (3x3 s2 3 -> 32 at 224x224; 3x3 32 -> 64 at 112x112, batch 8)
and the dense TCN's causal dilated 1-D conv (C 64, k 3, N 8, T 1000 / 4096),
plus a 1x1 stride-2 shortcut and a 256-channel 3x3 conv (where else "auto" goes).
Per shape and implementation: the forward, and the training-step work
(forward + input gradient + weight gradient; the stem's first conv without
the input gradient, as in training: it reads the data). PyTorch in NCHW and
channels_last for 2-D (the faster is the reference), NCW for 1-D; torch
threads = cores. Method: benchmarks/_harness.py (interleaved rounds, medians).

    python benchmarks/dense_ab.py [--impls xla patches native] [--shapes stem0 stem1 tcn1000_d1 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _harness import time_interleaved

from jaxdsc.ops import dense_conv

# name: (x shape NHWC/NWC, kernel size, C_out, stride, dilation, padding pairs, input gradient needed)
SHAPES = {
    "stem0": ((8, 224, 224, 3), (3, 3), 32, 2, 1, ((1, 1), (1, 1)), False),
    "stem1": ((8, 112, 112, 32), (3, 3), 64, 1, 1, ((1, 1), (1, 1)), True),
    "cifar_stem": ((128, 32, 32, 3), (3, 3), 32, 1, 1, ((1, 1), (1, 1)), False),  # DSCNet's stem
    # xception41's first shortcut (1x1 s2, 64 -> 128 at 112x112) and a mid-network 3x3 conv
    "sc1x1_s2": ((8, 112, 112, 64), (1, 1), 128, 2, 1, ((0, 0), (0, 0)), True),
    "c256": ((8, 28, 28, 256), (3, 3), 256, 1, 1, ((1, 1), (1, 1)), True),
    **{f"tcn{t}_d{d}": ((8, t, 64), (3,), 64, 1, d, ((2 * d, 0),), True)
       for t in (1000, 4096) for d in (1, 16, 256)},
}


def _jax_fns(x, w, ks, stride, dil, pads, need_dx, impl):
    rank = len(ks)
    kw = dict(strides=(stride,) * rank, padding=pads, dilation=(dil,) * rank, impl=impl)
    fwd = jax.jit(lambda x, w: dense_conv(x, w, **kw))

    def loss(x, w):
        return jnp.sum(dense_conv(x, w, **kw) * 0.5)  # d/dy = 0.5: the step's cotangent, cheaply

    step = jax.jit(jax.grad(loss, argnums=(0, 1) if need_dx else (1,)))
    return (lambda: fwd(x, w).block_until_ready(),
            lambda: jax.block_until_ready(step(x, w)))


def _torch_fns(shape, ks, c_out, stride, dil, pads, need_dx, layout):
    rank = len(ks)
    conv = (torch.nn.functional.conv1d if rank == 1 else torch.nn.functional.conv2d)
    lo = [p[0] for p in pads]
    x = torch.randn(shape[0], shape[-1], *shape[1:-1])
    w = torch.randn(c_out, shape[-1], *ks) * 0.1
    if rank == 2 and layout == "cl":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    if any(p[0] != p[1] for p in pads):  # causal: pad on the left, as torch_bridge's twin does
        x = torch.nn.functional.pad(x, [v for p in reversed(pads) for v in p])
        lo = 0
    x.requires_grad_(need_dx)
    w.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            conv(x, w, stride=stride, padding=lo, dilation=dil)

    def step():
        y = conv(x, w, stride=stride, padding=lo, dilation=dil)
        y.backward(torch.full_like(y, 0.5))
        x.grad = w.grad = None

    return fwd, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", nargs="+", default=["xla", "patches", "native"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    rng = np.random.default_rng(0)
    for name in args.shapes:
        shape, ks, c_out, stride, dil, pads, need_dx = SHAPES[name]
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal((*ks, shape[-1], c_out)) * 0.1, jnp.float32)
        cands = {}
        for impl in args.impls:
            cands[f"{impl} fwd"], cands[f"{impl} step"] = _jax_fns(x, w, ks, stride, dil, pads, need_dx, impl)
        for layout in ("cf", "cl") if len(ks) == 2 else ("cf",):
            f, s = _torch_fns(shape, ks, c_out, stride, dil, pads, need_dx, layout)
            cands[f"torch_{layout} fwd"], cands[f"torch_{layout} step"] = f, s
        t = time_interleaved(cands, rounds=args.rounds)
        for mode in ("fwd", "step"):
            ref = min(t[k].median_ms for k in t if k.startswith("torch") and k.endswith(mode))
            row = ", ".join(f"{k.split()[0]} {t[k].median_ms:.2f}" for k in t if k.endswith(mode))
            ratios = ", ".join(f"{i} {t[f'{i} {mode}'].median_ms / ref:.2f}" for i in args.impls)
            print(f"{name} {mode}: {row} ms | / best torch: {ratios}", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
