"""Step scan: images/s of the trainer's jitted CIFAR step for variants of a preset, JAX only.

What chose the ``cifar10-cpu`` layout (BENCHMARKS.md, "CIFAR-10 training runs"): every variant is
the preset with trainer-config overrides (the flat field names of ``train.config``, as
``--widths`` -> ``widths``), built and stepped as ``benchmarks/train_step.py`` does (the trainer's
model, optimizer, donated state, augmentation and on-device batch gather), on random uint8
images (or ``--data-dir``'s CIFAR-10), interleaved by ``benchmarks/_harness.py``. The first
variant is the reference of the ratios. No PyTorch here: ``benchmarks/run_train_step.sh`` measures the preset against it.

    python benchmarks/step_scan.py base='{}' w128='{"widths": [128, 256, 384]}' \\
        stem32='{"widths": [128, 256, 384], "stem_width": 32}' --rounds 3 --block-s 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from _harness import env_info, time_interleaved
from train_step import JaxTrainer, _data

from train.config import PRESETS, ConfigError, validate, with_overrides
from train.feed import Split, epoch_order, make_mesh
from train.model import describe


def _variant(text: str) -> tuple[str, dict]:
    name, sep, overrides = text.partition("=")
    try:
        value = json.loads(overrides) if sep else None
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"variant {name!r}: overrides are not JSON ({e})") from None
    if not name or not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a variant is NAME='{{JSON object}}', got {text!r}")
    return name, value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", type=_variant, help="NAME='{\"field\": value, ...}' (first: reference)")
    ap.add_argument("--preset", default="cifar10-cpu", choices=sorted(PRESETS))
    ap.add_argument("--image-size", type=int, default=0, help="training size (0: the data's 32x32)")
    ap.add_argument("--data-dir", default="", help="real CIFAR-10 (else random uint8 images; speed is the same)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block-s", type=float, default=12.0, help="seconds per variant per round")
    args = ap.parse_args()
    images, labels, _ = _data(args)
    mesh = make_mesh()
    split = Split(images, labels, mesh, on_device=True)
    fns, configs = {}, {}
    for name, overrides in args.variants:
        try:
            cfg = validate(with_overrides(PRESETS[args.preset], overrides))
        except ConfigError as e:
            ap.error(f"variant {name!r}: {e}")
        bs = cfg.optim.batch_size
        spe = len(images) // bs
        jt = JaxTrainer(cfg, mesh, spe, image_size=args.image_size)
        order, count = epoch_order(cfg.run.seed, 0, split.n), [0]

        def step(jt: JaxTrainer = jt, order: np.ndarray = order, count: list[int] = count, bs: int = bs,
                 spe: int = spe) -> None:
            k = count[0] % spe
            count[0] += 1
            jt.step(split.batch(order[k * bs:(k + 1) * bs]))

        fns[name], configs[name] = step, cfg
    print(json.dumps(env_info()))
    timings = time_interleaved(fns, rounds=args.rounds, block_s=args.block_s)
    ref = None
    for name, t in timings.items():
        cfg = configs[name]
        bs = cfg.optim.batch_size
        ips = bs * 1e3 / t.median_ms
        ref = ref or ips
        print(f"{name:>12}: {ips:7.1f} img/s  {ips / ref:.3f}x  (best round {bs * 1e3 / t.min_ms:.1f})  "
              f"{describe(cfg.model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
