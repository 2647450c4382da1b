"""Measure the timm zoo's parity: eval-mode max error of every supported timm model.

For each architecture: ``timm.create_model`` (random init) with random biases, BatchNorm
affine parameters and running statistics, converted with ``torch_bridge.from_torch``;
prints a Markdown table row with the parameter count and ``max |y_jax - y_timm| / max |y_timm|``
on a random ``(1, 3, H, W)`` input. Usage::

    python scripts/timm_zoo_parity.py [--size 97 131] [names ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _zoo_checks as zc

import torch_bridge
from jaxdsc.models.timm_efficientnet import ARCHS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(ARCHS))
    ap.add_argument("--size", type=int, nargs=2, default=(97, 131))
    args = ap.parse_args()
    print("| model | params | eval max rel. error | input |")
    print("|---|---:|---:|---|")
    for name in args.names:
        t0 = time.time()
        torch.manual_seed(0)
        tm = zc.randomize(timm.create_model(name), seed=0).eval()
        jm = torch_bridge.from_torch(tm)
        x = np.random.default_rng(0).standard_normal((1, 3, *args.size)).astype(np.float32)
        with torch.no_grad():
            want = tm(torch.from_numpy(x)).numpy()
        got = nnx.jit(lambda m, x: m(x))(jm, zc.nchw_to_nhwc(x))
        err = zc.rel_err(np.asarray(got), want)
        n = sum(p.numel() for p in tm.parameters())
        print(f"| timm:{name} | {n / 1e6:.2f} M | {err:.1e} | {args.size[0]}x{args.size[1]} |", flush=True)
        print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
