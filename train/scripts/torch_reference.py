"""The PyTorch reference for the trainer's benchmark: same net, data, schedule and update rule.

    python train/scripts/torch_reference.py --preset cifar10-cpu --data-dir data --workdir runs/torch-ref

Takes the trainer's own flags (same defaults and presets) and trains
``torch_bridge.nn.DSCNet`` with a plain PyTorch loop: SGD-Nesterov (or AdamW)
with the trainer's schedule evaluated per step, decoupled weight decay on
kernels only, label smoothing, the same crop+flip augmentation (vectorised on
tensors) and the same per-epoch data order. Prints one line per epoch and
writes ``WORKDIR/torch_summary.json`` (test accuracy, images/s) for the
images/s ratio in BENCHMARKS.md. No checkpoints, EMA, freezing or devices:
it is a speed and sanity reference, not a second trainer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch_bridge.nn import DSCNet
from train.cli import parse
from train.config import default_data_dir
from train.data import load_or_download
from train.feed import epoch_order
from train.optim import schedule


def augment(x: torch.Tensor, gen: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """uint8 NCHW batch -> float crops (zero padding) with random flips, as train/augment.py."""
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
        rows = (off[:, 0, None] + torch.arange(h))[:, None, :, None]
        cols = (off[:, 1, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.float() / 255


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse(argv)
    d, m, o = cfg.data, cfg.model, cfg.optim
    torch.manual_seed(cfg.run.seed)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    ds = load_or_download(d.data_dir, default_data_dir(), d.download_url, d.download_md5).limit(d.train_limit, d.test_limit)
    train_x = torch.from_numpy(ds.train_images).permute(0, 3, 1, 2).contiguous()
    train_y = torch.from_numpy(ds.train_labels).long()
    test_x = torch.from_numpy(ds.test_images).permute(0, 3, 1, 2).float() / 255
    test_y = torch.from_numpy(ds.test_labels).long()
    model = DSCNet(m.num_classes, width=m.width, depth=m.depth, momentum=round(1 - m.bn_momentum, 12))
    spe = len(train_y) // o.batch_size
    lr_at = schedule(o, o.lr, spe)
    decay = [p for p in model.parameters() if p.ndim > 1]
    if o.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.momentum, o.beta2))
    workdir = Path(cfg.run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    images, seconds, step, acc = 0, 0.0, 0, 0.0
    for epoch in range(o.epochs):
        order = torch.from_numpy(epoch_order(cfg.run.seed, epoch, len(train_y)).astype(np.int64))
        model.train()
        t0 = time.perf_counter()
        for pos in range(spe):
            idx = order[pos * o.batch_size:(pos + 1) * o.batch_size]
            x = augment(train_x[idx], gen, d.crop_padding, d.flip)
            lr = float(lr_at(step))
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=o.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # decoupled weight decay on kernels, as train/optim.py
                for p in decay:
                    p.mul_(1 - lr * o.weight_decay)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            step += 1
        dt = time.perf_counter() - t0
        if epoch > 0:  # the first epoch carries warm-up costs, as the JAX compile is excluded there
            images, seconds = images + spe * o.batch_size, seconds + dt
        model.eval()
        with torch.no_grad():
            acc = float(sum((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum()
                            for i in range(0, len(test_y), 1000))) / len(test_y)
        print(f"epoch {epoch + 1:3d}/{o.epochs}  loss {loss.item():.4f}  test acc {acc:.4f}  "
              f"{spe * o.batch_size / dt:7.0f} img/s", flush=True)
    ips = images / seconds if seconds else spe * o.batch_size / dt
    (workdir / "torch_summary.json").write_text(json.dumps(
        {"test_accuracy": acc, "images_per_second": round(ips, 1), "epochs": o.epochs,
         "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
