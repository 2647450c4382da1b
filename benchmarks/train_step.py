"""Whole-training-step benchmark (issue 5): the JAX trainer's jitted step vs the same step in PyTorch.

In one process, for the trainer's CIFAR model (``--preset cifar10-cpu``:
DSCNet w32 d2, batch 128, SGD-Nesterov, decoupled weight decay on kernels,
label smoothing; ``--width`` / ``--depth`` / ``--batch-size`` take comma lists
for other configs), times

* ``jax``: the trainer's own pieces (``train.model``, ``train.optim``,
  ``train.steps.make_train_step`` + ``jit_steps``: donated state, crop+flip on
  the device, the uint8 data set on the device and the batch gathered there by
  ``train.feed.Split``), one call = gather + step + metrics to host, as one
  iteration of ``train/loop.py``;
* ``torch_nchw`` / ``torch_cl``: ``torch_bridge.nn.DSCNet`` with the same
  initial weights (``torch_bridge.to_torch``), stepped by
  ``TorchTrainStep`` of ``train/scripts/torch_reference.py`` (index the uint8
  batch, the same augmentation, loss and update rule) in contiguous NCHW and
  in channels_last (the faster is the reference), ``--threads`` torch threads;
* the eval step (inference, ``--eval-batch`` images, uint8 -> float included)
  of both.

Candidates are interleaved (``benchmarks/_harness.py``: rounds of >= ``--block-s``
seconds per candidate, rotated order); reported are medians over rounds,
images/s and the ratio jaxdsc / best torch (>= 1 is the goal). Before timing,
a sanity check runs ``--check-steps`` steps of both on the same first batch
without augmentation and compares the losses (the update rule included) and
the parameters afterwards, so the comparison is of the same function.

    python benchmarks/train_step.py                                  # cifar10-cpu, ~2-3 min
    python benchmarks/train_step.py --width 32,48 --batch-size 128,256
    benchmarks/run_train_step.sh nopf2                               # with the allocator setting
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from _harness import env_info, time_interleaved

import torch_bridge
from train import steps
from train.config import PRESETS, Config, validate, with_overrides
from train.feed import Split, epoch_order, make_mesh
from train.model import describe, initial_model
from train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]

def _torch_reference() -> Any:
    spec = importlib.util.spec_from_file_location("torch_reference", ROOT / "train/scripts/torch_reference.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TREF = _torch_reference()
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
LOSS_TOL = 1e-4  # absolute, on losses of about 2.5 (float32, different conv algorithms)
LOADED = 2.5  # 1-min load average above which a run is marked as loaded
# max |p_jax - p_torch| / max |p_after - p_before| per tensor (incl. BN running stats). Three small
# steps move the weights in front of a BatchNorm very little, and torch's float32 BN input gradient
# is 5e-6 relative off float64 (jaxdsc's 1.5e-7), so 1e-2 observed (blocks.4.pointwise.weight) is
# torch's rounding: the guard is against a different function, which gives O(1).
PARAM_TOL = 2e-2


def _data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """Training images (N, 32, 32, 3) uint8 and labels: real CIFAR-10 when --data-dir is given, else random."""
    if args.data_dir:
        from train.data import load

        ds = load(args.data_dir)
        return ds.train_images, ds.train_labels, f"CIFAR-10 from {args.data_dir}"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (TRAIN_IMAGES, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, TRAIN_IMAGES).astype(np.int32), "random uint8 (50000 images)"


class JaxTrainer:
    """The trainer's model, optimizer, state and jitted steps, built as ``train.loop.Trainer`` builds them."""

    def __init__(self, cfg: Config, mesh: Any, steps_per_epoch: int, *, augment: bool = True, image_size: int = 0):
        model, _ = initial_model(cfg.model, cfg.run.seed)
        self.torch_model = torch_bridge.to_torch(model)  # same initial weights, train mode
        graph_train, graph_eval, params, stats, consts = steps.split_model(model)
        self.graph_train = graph_train
        self.tx, self.lr_fn = make_optimizer(cfg.optim, params, steps_per_epoch)
        self.state = steps.create_state(params, stats, consts, self.tx, mesh, seed=cfg.run.seed,
                                        ema=cfg.optim.ema_decay > 0)
        train_fn = steps.make_train_step(
            graph_train, self.tx, self.lr_fn, num_classes=cfg.model.num_classes,
            label_smoothing=cfg.optim.label_smoothing, crop_padding=cfg.data.crop_padding if augment else 0,
            flip=cfg.data.flip and augment, ema_decay=cfg.optim.ema_decay, image_size=image_size or None)
        self.train_step, self.eval_step = steps.jit_steps(train_fn, steps.make_eval_step(graph_eval), mesh)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.state, metrics = self.train_step(self.state, batch)
        return steps.to_host(metrics)


def sanity_check(cfg: Config, mesh: Any, spe: int, split: Split, images: np.ndarray, labels: np.ndarray,
                 n_steps: int, image_size: int = 0) -> dict[str, Any]:
    """``n_steps`` steps of JAX and torch (NCHW and channels_last) on the same first batch, no augmentation.

    Compares the losses of every step (JAX vs both layouts) and the parameters and BN statistics after the
    steps (JAX vs NCHW).
    """
    bs = cfg.optim.batch_size
    jt = JaxTrainer(cfg, mesh, spe, augment=False, image_size=image_size)
    idx = epoch_order(cfg.run.seed, 0, split.n)[:bs]
    sizes = (image_size,) if image_size else ()
    tstep_cl = TREF.TorchTrainStep(copy.deepcopy(jt.torch_model), cfg.optim, spe, crop_padding=0, flip=False,
                                   layout="channels_last", train_sizes=sizes)
    tstep = TREF.TorchTrainStep(jt.torch_model, cfg.optim, spe, crop_padding=0, flip=False, layout="nchw",
                                train_sizes=sizes)
    x_t = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous()
    y_t = torch.from_numpy(labels[idx]).long()
    before = {k: v.detach().clone() for k, v in jt.torch_model.state_dict().items()}
    jax_losses, torch_losses, cl_losses = [], [], []
    for k in range(n_steps):
        jax_losses.append(float(jt.step(split.batch(idx))["loss"]))
        torch_losses.append(float(tstep(x_t, y_t, k)))
        cl_losses.append(float(tstep_cl(x_t, y_t, k)))
    # Parameters after the steps, compared in the torch layout (to_torch of the JAX state), relative to
    # how far the steps moved each tensor (so a wrong update rule or BN update shows, rounding does not).
    from flax import nnx

    host = steps.to_host((jt.state.params, jt.state.batch_stats, jt.state.consts))
    after = torch_bridge.to_torch(nnx.merge(jt.graph_train, *host)).state_dict()
    got = tstep.model.state_dict()
    rel = {}
    for k, v in got.items():
        if v.is_floating_point():
            moved = float((v.float() - before[k].float()).abs().max())
            if moved > 0:
                rel[k] = float((after[k].float() - v.float()).abs().max()) / moved
    worst = max(rel, key=lambda k: rel[k])
    loss_diff = max(max(abs(a - b), abs(a - c)) for a, b, c in zip(jax_losses, torch_losses, cl_losses, strict=True))
    return {
        "steps": n_steps, "jax_losses": jax_losses, "torch_losses": torch_losses, "torch_cl_losses": cl_losses,
        "max_abs_loss_diff": loss_diff, "loss_tolerance": LOSS_TOL,
        "lr_per_step": [float(jt.lr_fn(k)) for k in range(n_steps)],
        "max_abs_param_diff": max(float((after[k].float() - got[k].float()).abs().max()) for k in rel),
        "worst_param_diff_over_update": rel[worst], "worst_param": worst, "param_tolerance": PARAM_TOL,
        "ok": loss_diff <= LOSS_TOL and rel[worst] <= PARAM_TOL,
    }


def bench_config(args: argparse.Namespace, cfg: Config, images: np.ndarray, labels: np.ndarray,
                 image_size: int = 0) -> dict[str, Any]:
    mesh = make_mesh()
    bs, ebs = cfg.optim.batch_size, args.eval_batch
    spe = TRAIN_IMAGES // bs
    split = Split(images, labels, mesh, on_device=True)  # what data_on_device=auto picks on CPU
    test = Split(images[:TEST_IMAGES], labels[:TEST_IMAGES], mesh, on_device=True)
    t0 = time.perf_counter()
    # The sanity check compares float32 losses and updates; bfloat16 products (PyTorch: autocast) differ by more.
    sanity = (sanity_check(cfg, mesh, spe, split, images, labels, args.check_steps, image_size)
              if args.check_steps and cfg.model.precision == "float32" else None)
    if sanity:
        print(f"  sanity ({args.check_steps} steps, no augmentation, lr {sanity['lr_per_step'][0]:.4g}..): "
              f"loss jax {sanity['jax_losses']} torch {sanity['torch_losses']}, max |diff| "
              f"{sanity['max_abs_loss_diff']:.2e} (tol {LOSS_TOL:g}); params: max |diff| / |update| "
              f"{sanity['worst_param_diff_over_update']:.2e} ({sanity['worst_param']}, tol {PARAM_TOL:g}), "
              f"max |diff| {sanity['max_abs_param_diff']:.1e}: {'OK' if sanity['ok'] else 'FAILED'}", flush=True)
    jt = JaxTrainer(cfg, mesh, spe, image_size=image_size)
    order = epoch_order(cfg.run.seed, 0, split.n)
    counter = {"jax": 0}

    def jax_train() -> None:
        k = counter["jax"] % spe
        counter["jax"] += 1
        jt.step(split.batch(order[k * bs:(k + 1) * bs]))

    eval_idx = np.arange(ebs, dtype=np.int32) % TEST_IMAGES
    eval_batch = {**test.batch(eval_idx), "mask": np.ones(ebs, np.float32)}

    def jax_eval() -> None:
        steps.to_host(jt.eval_step(jt.state, eval_batch))

    fns = {"jax_train": jax_train, "jax_eval": jax_eval}
    train_x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    train_y = torch.from_numpy(labels).long()
    order_t = torch.from_numpy(order.astype(np.int64))
    gen = torch.Generator().manual_seed(cfg.run.seed)
    autocast = cfg.model.precision != "float32"  # PyTorch's counterpart of our bfloat16 modes
    for layout, tag in (("nchw", "torch_nchw"), ("channels_last", "torch_cl")):
        tstep = TREF.TorchTrainStep(copy.deepcopy(jt.torch_model), cfg.optim, spe, crop_padding=cfg.data.crop_padding,
                                    flip=cfg.data.flip, layout=layout, gen=gen,
                                    train_sizes=(image_size,) if image_size else (),
                                    autocast=autocast, cutout=cfg.data.cutout)
        emodel = copy.deepcopy(jt.torch_model).to(memory_format=TREF.LAYOUTS[layout]).eval()
        n = {"k": 0}

        def t_train(tstep: Any = tstep, n: dict[str, int] = n) -> None:
            k = n["k"] % spe
            n["k"] += 1
            idx = order_t[k * bs:(k + 1) * bs]
            tstep(train_x[idx], train_y[idx], k)

        def t_eval(emodel: Any = emodel, fmt: Any = TREF.LAYOUTS[layout],
                   autocast: bool = autocast) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                x = (train_x[:ebs].float() / 255).contiguous(memory_format=fmt)
                emodel(x).argmax(1)

        fns[f"{tag}_train"], fns[f"{tag}_eval"] = t_train, t_eval
    setup_s = time.perf_counter() - t0
    load0 = os.getloadavg()
    t1 = time.perf_counter()
    timings = time_interleaved(fns, rounds=args.rounds, block_s=args.block_s)
    load1 = os.getloadavg()
    wall = time.perf_counter() - t1
    ips = {k: (bs if k.endswith("_train") else ebs) / (t.median_ms * 1e-3) for k, t in timings.items()}
    ips_best = {k: (bs if k.endswith("_train") else ebs) / (t.min_ms * 1e-3) for k, t in timings.items()}
    out: dict[str, Any] = {
        "config": {"model": describe(cfg.model) + (f" at {image_size}x{image_size}" if image_size else "")
                   + (f", {cfg.model.precision}" if cfg.model.precision != "float32" else ""), "width": cfg.model.width, "depth": cfg.model.depth, "batch_size": bs, "eval_batch": ebs,
                   "optimizer": cfg.optim.optimizer, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay,
                   "label_smoothing": cfg.optim.label_smoothing, "crop_padding": cfg.data.crop_padding,
                   "flip": cfg.data.flip, "impl": cfg.model.impl, "precision": cfg.model.precision,
                   "params": sum(p.numel() for p in jt.torch_model.parameters())},
        "sanity": sanity, "setup_seconds": round(setup_s, 1), "timing_seconds": round(wall, 1),
        "loadavg_before": load0, "loadavg_after": load1,
        "timings": {k: vars(t) for k, t in timings.items()},
        "images_per_second": {k: round(v, 1) for k, v in ips.items()},
        "images_per_second_best_round": {k: round(v, 1) for k, v in ips_best.items()},
    }
    for kind in ("train", "eval"):
        best = max(("torch_nchw", "torch_cl"), key=lambda t: ips[f"{t}_{kind}"])
        out[f"{kind}_reference"] = best
        out[f"{kind}_ratio"] = round(ips[f"jax_{kind}"] / ips[f"{best}_{kind}"], 3)
        out[f"{kind}_ratio_best_round"] = round(ips_best[f"jax_{kind}"] / ips_best[f"{best}_{kind}"], 3)
    # What the preset's schedule costs at these speeds (CIFAR-10: 50k train / 10k test images).
    step_s = timings["jax_train"].median_ms * 1e-3
    epoch_s = spe * step_s
    eval_s = math.ceil(TEST_IMAGES / ebs) * timings["jax_eval"].median_ms * 1e-3
    out["estimate"] = {
        "epoch_train_seconds": round(epoch_s, 1), "eval_seconds": round(eval_s, 1),
        "epochs": cfg.optim.epochs, "schedule_train_seconds": round(cfg.optim.epochs * epoch_s, 1),
        "schedule_wall_seconds": round(cfg.optim.epochs * (epoch_s + eval_s), 1),
        "epochs_in_1800_train_seconds": round(1800 / epoch_s, 2),
        "torch_epoch_train_seconds": round(spe * bs / ips[f"{out['train_reference']}_train"], 1),
    }
    return out


def markdown(results: dict[str, Any]) -> str:
    env = results["env"]
    lines = [
        f"Whole training step, `--preset {results['args']['preset']}` model and optimizer; "
        f"GLIBC_TUNABLES: {env['GLIBC_TUNABLES']}; torch {env['torch']} ({results['args']['threads']} threads), "
        f"jax {env['jax']}; data: {results['data']}.",
        "",
        "| config | jaxdsc train img/s | torch NCHW | torch CL | **jaxdsc / best torch** | jaxdsc eval img/s | "
        "torch NCHW eval | torch CL eval | **eval ratio** | same loss (max diff) | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["configs"]:
        c, i = r["config"], r["images_per_second"]
        s = r["sanity"]
        check = "-" if s is None else f"{'yes' if s['ok'] else 'NO'} ({s['max_abs_loss_diff']:.1e})"
        lines.append(
            f"| {_name(c)} b{c['batch_size']} (eval b{c['eval_batch']}) | {i['jax_train']:.0f} | "
            f"{i['torch_nchw_train']:.0f} | {i['torch_cl_train']:.0f} | **{r['train_ratio']:.2f}** "
            f"({r['train_ratio_best_round']:.2f}) | {i['jax_eval']:.0f} | {i['torch_nchw_eval']:.0f} | "
            f"{i['torch_cl_eval']:.0f} | **{r['eval_ratio']:.2f}** ({r['eval_ratio_best_round']:.2f}) | {check} | "
            f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |")
    if any(max(r["loadavg_before"][0], r["loadavg_after"][0]) > LOADED for r in results["configs"]):
        lines += ["", f"**Loaded machine** (1-min load above {LOADED}; this benchmark alone makes about 2): "
                      "PyTorch's OpenMP threads lose far more than jaxdsc under load, so these ratios flatter "
                      "jaxdsc; quote only runs on a quiet machine."]
    lines += ["", "Ratios: medians over rounds (in brackets: best rounds). Step times (median ms) and estimates:", "",
              "| config | jaxdsc step ms | torch NCHW ms | torch CL ms | epoch (s), jaxdsc / torch | "
              "preset schedule: train s (+eval) | epochs in 30 min |",
              "|---|---|---|---|---|---|---|"]
    for r in results["configs"]:
        c, t, e = r["config"], r["timings"], r["estimate"]
        lines.append(
            f"| {_name(c)} b{c['batch_size']} | {t['jax_train']['median_ms']:.0f} | "
            f"{t['torch_nchw_train']['median_ms']:.0f} | {t['torch_cl_train']['median_ms']:.0f} | "
            f"{e['epoch_train_seconds']:.0f} / {e['torch_epoch_train_seconds']:.0f} | "
            f"{e['epochs']} ep: {e['schedule_train_seconds']:.0f} (+{e['epochs'] * e['eval_seconds']:.0f}) | "
            f"{e['epochs_in_1800_train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    images, labels, what = _data(args)
    results: dict[str, Any] = {"env": env_info(), "args": vars(args), "data": what, "configs": []}
    for width, depth, bs, size, precision in itertools.product(args.width, args.depth, args.batch_size,
                                                               args.image_size, args.precision):
        over = {"width": width, "depth": depth, "batch_size": bs, "precision": precision}
        preset = PRESETS[args.preset]
        if width and preset.model.widths:  # scale the preset's stage widths to a first stage of `width`
            over["widths"] = [v * width // preset.model.widths[0] for v in preset.model.widths]
        cfg = validate(with_overrides(preset, {k: v for k, v in over.items() if v}))
        at = f" at {size}x{size}" if size else ""
        at += f", {cfg.model.precision}" if cfg.model.precision != "float32" else ""
        print(f"config {describe(cfg.model)} b{cfg.optim.batch_size}{at} (load {os.getloadavg()[0]:.1f})", flush=True)
        r = bench_config(args, cfg, images, labels, size)
        i = r["images_per_second"]
        print(f"  train img/s: jax {i['jax_train']:.0f}, torch nchw {i['torch_nchw_train']:.0f}, "
              f"cl {i['torch_cl_train']:.0f} -> ratio {r['train_ratio']:.2f}; eval img/s: jax "
              f"{i['jax_eval']:.0f}, torch nchw {i['torch_nchw_eval']:.0f}, cl {i['torch_cl_eval']:.0f} "
              f"-> ratio {r['eval_ratio']:.2f} (load {r['loadavg_before'][0]:.1f} -> "
              f"{r['loadavg_after'][0]:.1f})", flush=True)
        results["configs"].append(r)
    results["ok"] = all(r["sanity"] is None or r["sanity"]["ok"] for r in results["configs"])
    return results


def _name(c: dict[str, Any]) -> str:
    """The model of a result row (older result files have width and depth only)."""
    return c.get("model") or f"w{c['width']} d{c['depth']}"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10-cpu", choices=sorted(PRESETS), help="trainer preset (model, optimizer)")
    ap.add_argument("--width", type=_ints, default=[0], help="comma list of widths (0: the preset's)")
    ap.add_argument("--depth", type=_ints, default=[0], help="comma list of depths (0: the preset's)")
    ap.add_argument("--batch-size", type=_ints, default=[0], help="comma list of batch sizes (0: the preset's)")
    ap.add_argument("--image-size", type=_ints, default=[0], help="comma list of training image sizes, as "
                    "--train-sizes phases (0: the data's 32x32); evaluation stays at 32x32")
    ap.add_argument("--precision", type=lambda t: [v for v in t.split(",") if v], default=[""],
                    help="comma list of --precision values (empty: the preset's); PyTorch runs under "
                         "torch.autocast (bfloat16) for any but float32")
    ap.add_argument("--eval-batch", type=int, default=500, help="eval-step batch (the preset's eval batch: 500)")
    ap.add_argument("--data-dir", default="", help="real CIFAR-10 (else random uint8 images; speed is the same)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block-s", type=float, default=1.5, help="seconds per candidate per round (at least one call)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--check-steps", type=int, default=3, help="sanity-check steps on one batch (0: skip)")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--from-json", type=Path, help="only rebuild the tables from an earlier --json")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = run(args)
        results["env"]["loadavg_at_end"] = os.getloadavg()
    table = markdown(results)
    print(table)
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0 if results.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
