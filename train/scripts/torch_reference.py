"""The PyTorch reference for the trainer's benchmark: same net, data, schedule and update rule.

    python train/scripts/torch_reference.py --preset cifar10-cpu --data-dir data --workdir runs/torch-ref
    python train/scripts/torch_reference.py --torch-layout nchw --preset cifar10-cpu ...   # other layout

Takes the trainer's own flags (same defaults and presets) and trains
``torch_bridge.nn.DSCNet`` with a plain PyTorch loop: SGD-Nesterov (or AdamW)
with the trainer's schedule evaluated per step, decoupled weight decay on
kernels only, label smoothing, the same crop+flip augmentation (vectorised on
tensors), the same per-epoch data order, progressive resizing
(``--train-sizes``), stem initialisation (``--stem-init``) and test-time
augmentation (``--tta``); ``--precision`` other than float32 runs under
``torch.autocast`` (bfloat16). Own flags (before or among the trainer's):
``--torch-layout {channels_last,nchw}`` (default channels_last,
the faster one for this net on CPU, see ``benchmarks/train_step.py``) and
``--torch-threads N`` (default 2).

Prints one line per epoch and writes ``WORKDIR/torch_metrics.jsonl`` (one
record per epoch: test accuracy, ``train_seconds``) and
``WORKDIR/torch_summary.json`` (best/final test accuracy, time to 80/85/90/91%,
images/s) for the images/s ratio in BENCHMARKS.md. ``images_per_second``
leaves out the first step of the process only, as the JAX trainer leaves out
its compiling first step, so a one-epoch run gives the steady-state speed.
``train_seconds`` counts training steps only (no evaluation), as the JAX
trainer's does. No checkpoints, EMA, freezing or devices: it is a speed and
sanity reference, not a second trainer.

``TorchTrainStep`` is the step itself; ``benchmarks/train_step.py`` times it
against the JAX trainer's jitted step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch_bridge.nn import DSCNet
from train import malloc
from train.cli import parse
from train.config import ModelConfig, OptimConfig, default_data_dir
from train.data import load_or_download
from train.feed import epoch_order
from train.model import describe, dscnet_kwargs
from train.optim import schedule
from train.resize import size_at
from train.whiten import stem_filters

LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def augment(x: torch.Tensor, gen: torch.Generator | None, pad: int, flip: bool, cutout: int = 0) -> torch.Tensor:
    """uint8 NCHW batch -> float crops (zero padding) with random flips and cutout, as train/augment.py."""
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
    if cutout:
        corner = torch.stack([torch.randint(0, e, (n,), generator=gen) for e in (h, w)], 1) - cutout // 2
        pos_r, pos_c = torch.arange(h), torch.arange(w)
        rows = (pos_r >= corner[:, :1]) & (pos_r < corner[:, :1] + cutout)
        cols = (pos_c >= corner[:, 1:]) & (pos_c < corner[:, 1:] + cutout)
        x = x.masked_fill((rows[:, None, :, None] & cols[:, None, None, :]), 0)
    return x.float() / 255


def build_model(m: ModelConfig) -> DSCNet:
    """A fresh ``torch_bridge.nn.DSCNet`` with the trainer's model settings (BN momentum in torch terms)."""
    return DSCNet(m.num_classes, momentum=round(1 - m.bn_momentum, 12), **dscnet_kwargs(m))


def whiten_stem(model: DSCNet, images: np.ndarray) -> int:
    """``train.whiten.whiten_stem`` for the PyTorch twin (the same NumPy filters, OIHW); returns how many."""
    conv = model.stem.conv
    filters = stem_filters(images, model.normalize.mean.numpy(), model.normalize.std.numpy(), conv.kernel_size[0],
                           conv.out_channels)
    with torch.no_grad():
        conv.weight[:filters.shape[-1]] = torch.from_numpy(filters.transpose(3, 2, 0, 1))
    return filters.shape[-1]


class TorchTrainStep:
    """One training step of ``model``, the update rule of ``train/optim.py`` in PyTorch.

    ``step(x_uint8_nchw, labels, k)``: augmentation (``gen``), forward in train
    mode, cross-entropy with label smoothing, backward, decoupled weight decay
    ``p *= 1 - lr * wd`` on kernels (``ndim > 1``; never norms/biases), then
    SGD-Nesterov (or Adam) at ``lr = schedule(k)``. Returns the loss (a 0-d
    tensor). ``layout`` is the memory format of the model and the input batch. ``autocast``:
    PyTorch's CPU mixed precision (``torch.autocast``, bfloat16 convs and matmuls: oneDNN's AMX
    kernels where the CPU has them), its counterpart of ``--precision bfloat16`` / ``bf16-matmul``.
    """

    def __init__(self, model: torch.nn.Module, o: OptimConfig, steps_per_epoch: int, *, crop_padding: int,
                 flip: bool, layout: str = "channels_last", gen: torch.Generator | None = None,
                 train_sizes: Sequence[int] = (), autocast: bool = False, cutout: int = 0):
        self.fmt, self.autocast = LAYOUTS[layout], autocast
        self.train_sizes, self.total_steps = tuple(train_sizes), steps_per_epoch * o.epochs
        self.model = model.to(memory_format=self.fmt)
        self.o, self.crop_padding, self.flip, self.cutout, self.gen = o, crop_padding, flip, cutout, gen
        self.lr_at = schedule(o, o.lr, steps_per_epoch)
        self.decay = [p for p in model.parameters() if p.ndim > 1]
        if o.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                                              nesterov=True)
        else:
            self.opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.momentum, o.beta2))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        x = augment(x, self.gen, self.crop_padding, self.flip, self.cutout)
        if self.train_sizes:  # progressive resizing, as train/resize.py
            size = size_at(self.train_sizes, k, self.total_steps)
            if x.shape[2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.contiguous(memory_format=self.fmt)
        lr = float(self.lr_at(k))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.o.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # decoupled weight decay on kernels, as train/optim.py
            for p in self.decay:
                p.mul_(1 - lr * self.o.weight_decay)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return loss.detach()


def tta_logits(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``train/tta.py`` in PyTorch (NCHW): logits averaged over mirrored and one-pixel-shifted views."""
    if mode == "none":
        return model(x)
    pair = lambda v: 0.5 * (model(v) + model(v.flip(3)))  # noqa: E731
    logits = pair(x)
    if mode == "flip":
        return logits
    h, w = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return 0.5 * logits + 0.25 * (pair(padded[:, :, :h, :w]) + pair(padded[:, :, 2:, 2:]))


def evaluate(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, layout: str,
             batch_size: int = 1000, tta: str = "none", autocast: bool = False) -> float:
    """Test accuracy in eval mode (running BN statistics), uint8 NCHW images converted per batch."""
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(y), batch_size):
            x = (x_uint8[i:i + batch_size].float() / 255).contiguous(memory_format=LAYOUTS[layout])
            correct += int((tta_logits(model, x, tta).argmax(1) == y[i:i + batch_size]).sum())
    model.train()
    return correct / len(y)


def _time_to(records: list[dict[str, float]], target: float) -> float | None:
    hit = [r["train_seconds"] for r in records if r["test_accuracy"] >= target]
    return round(hit[0], 2) if hit else None


def parse_own(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--torch-layout", choices=sorted(LAYOUTS), default="channels_last")
    ap.add_argument("--torch-threads", type=int, default=2)
    return ap.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    own, rest = parse_own(argv)
    cfg, _ = parse(rest)
    malloc.tune()  # the allocator settings the JAX trainer runs with: equal footing for the images/s ratio
    d, m, o = cfg.data, cfg.model, cfg.optim
    torch.set_num_threads(own.torch_threads)
    torch.manual_seed(cfg.run.seed)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    ds = load_or_download(d.data_dir, default_data_dir(), d.download_url, d.download_md5).limit(d.train_limit, d.test_limit)
    train_x = torch.from_numpy(ds.train_images).permute(0, 3, 1, 2).contiguous()
    train_y = torch.from_numpy(ds.train_labels).long()
    test_x = torch.from_numpy(ds.test_images).permute(0, 3, 1, 2).contiguous()
    test_y = torch.from_numpy(ds.test_labels).long()
    model = build_model(m)
    if m.stem_init == "whiten":
        whiten_stem(model, ds.train_images)
    spe = len(train_y) // o.batch_size
    autocast = m.precision != "float32"
    step_fn = TorchTrainStep(model, o, spe, crop_padding=d.crop_padding, flip=d.flip, layout=own.torch_layout,
                             gen=gen, train_sizes=d.train_sizes, autocast=autocast, cutout=d.cutout)
    workdir = Path(cfg.run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "torch_metrics.jsonl"
    metrics_path.write_text("")
    print(f"torch reference: {o.epochs} epochs x {spe} steps, batch {o.batch_size}, "
          f"{sum(p.numel() for p in model.parameters())} params, layout {own.torch_layout}, "
          f"{torch.get_num_threads()} threads{', autocast bfloat16' if autocast else ''}", flush=True)
    records: list[dict[str, float]] = []
    fast_images, fast_seconds, train_seconds, step, acc = 0, 0.0, 0.0, 0, 0.0
    for epoch in range(o.epochs):
        order = torch.from_numpy(epoch_order(cfg.run.seed, epoch, len(train_y)).astype(np.int64))
        model.train()
        t_epoch = 0.0
        for pos in range(spe):
            t0 = time.perf_counter()
            idx = order[pos * o.batch_size:(pos + 1) * o.batch_size]
            loss = step_fn(train_x[idx], train_y[idx], step)
            dt = time.perf_counter() - t0
            if step > 0:  # the first step carries warm-up costs, as the JAX compile is left out there
                fast_images, fast_seconds = fast_images + o.batch_size, fast_seconds + dt
            t_epoch += dt
            step += 1
        train_seconds += t_epoch
        acc = evaluate(model, test_x, test_y, layout=own.torch_layout, tta=cfg.run.tta, autocast=autocast)
        rec = {"epoch": epoch + 1, "step": step, "test_accuracy": acc, "train_loss_last": float(loss),
               "train_seconds": round(train_seconds, 3), "images_per_second": round(spe * o.batch_size / t_epoch, 1)}
        records.append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"epoch {epoch + 1:3d}/{o.epochs}  loss {float(loss):.4f}  test acc {acc:.4f}  "
              f"{spe * o.batch_size / t_epoch:7.0f} img/s  {train_seconds:7.1f}s", flush=True)
    ips = fast_images / fast_seconds if fast_seconds else 0.0
    (workdir / "torch_summary.json").write_text(json.dumps(
        {"test_accuracy": acc, "best_test_accuracy": max(r["test_accuracy"] for r in records),
         **{f"time_to_{p}": _time_to(records, p / 100) for p in (80, 85, 90, 91)}, "tta": cfg.run.tta,
         "train_seconds": round(train_seconds, 3), "images_per_second": round(ips, 1), "epochs": o.epochs,
         "steps": step, "batch_size": o.batch_size, "model": describe(m),
         "layout": own.torch_layout, "autocast": autocast, "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
