"""Parity figures of the torchvision zoo (docs/model-zoo.md): max relative errors vs PyTorch.

Usage: ``PYTHONPATH=.:tests python scripts/zoo_parity.py [name ...]``. For each model: random
weights and BatchNorm statistics (tests/_zoo_checks.randomize), eval outputs on 2x3x97x131,
train-mode outputs and running statistics on 2x3x64x48, and float32 gradients (input and
parameters) of the same train pass, all relative to the reference's max |value|.
"""

from __future__ import annotations

import sys

import _zoo_checks as zc
import numpy as np
import torch
import torchvision

import torch_bridge

MODELS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "deeplabv3_mobilenet_v3_large": lambda: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=True),
    "lraspp_mobilenet_v3_large": lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None),
}


def main(names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in names or list(MODELS):
        torch.manual_seed(0)
        tm = zc.randomize(MODELS[name](), seed=0)
        jm = torch_bridge.from_torch(tm)
        params = sum(p.numel() for p in tm.parameters())
        ev = zc.check_eval(tm, jm, rng.standard_normal((2, 3, 97, 131)).astype(np.float32), rtol=1.0)
        tr = zc.check_train(tm, jm, rng.standard_normal((2, 3, 64, 48)).astype(np.float32), rtol=1.0,
                            grads=True)
        train_out = max(v for k, v in tr.items() if k.startswith("out:"))
        print(f"{name}: params {params:,} eval {ev:.1e} train {train_out:.1e} stats {tr['running_stats']:.1e} "
              f"grad_input {tr['grad:input']:.1e} grad_params {tr['grad:params']:.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
