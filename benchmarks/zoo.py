"""Model-zoo speed (issue 15): jaxdsc zoo models against the upstream PyTorch models, one process.

For each model, the upstream PyTorch instance is built by torchvision's / timm's own
constructor (DeepLabV3+: its PyTorch twin ``torch_bridge.nn.DeepLabV3Plus`` on torchvision's
MobileNetV2, the cheaper of the two backbones the issue names, output stride 32 as it has no
dilation, 21 classes),
and the jaxdsc model is ``torch_bridge.from_torch`` of it, so both hold the same weights and
BatchNorm buffers. Before timing, eval outputs and one train-mode loss are compared, so both
sides compute the same function. Timed (``benchmarks/_harness.py``: warm-up excluded, rounds
interleaved and rotated, medians over rounds), per model:

* ``eval``: inference. JAX: the eval-mode model, jitted forward of ``(state, x)``; torch:
  ``inference_mode``, eval mode.
* ``train``: one training step: train-mode forward (batch statistics), softmax cross-entropy
  against fixed random labels (per pixel for DeepLabV3+), gradients of every parameter, an SGD
  update (momentum 0.9) and the running-statistics update. JAX: one jitted pure function with
  parameters, optimiser state and BatchNorm statistics donated; torch: ``zero_grad``, forward,
  ``backward``, ``optimizer.step``. Dropout and stochastic depth are off on both sides, so both
  compute the same function (their cost is a few elementwise ops).

PyTorch runs both in its default NCHW layout and in channels_last (model and input); the faster
is reported. Torch threads: ``--threads`` (default: the number of cores). Figures are images/s
(batch / median time); ratio = jaxdsc / torch images/s (> 1: jaxdsc faster). Usage::

    python benchmarks/zoo.py --json /tmp/zoo.json                 # full (minutes; quiet CPU)
    python benchmarks/zoo.py --models torchvision:mobilenet_v2 --batch 2 --size 32 --rounds 1 --loss-rtol 0.05
    python benchmarks/zoo.py --models timm:xception41 --also-old-dense   # the dense kernel's before/after
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _harness import time_interleaved, write_results
from flax import nnx

import torch_bridge

MODELS = ("torchvision:mobilenet_v2", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
          "timm:xception41", "jaxdsc:deeplabv3plus")
# torchvision's MobileNetV2 has no dilation: it ends at stride 32 (ASPP rates 3/6/9).
DEEPLAB = dict(backbone="torchvision:mobilenet_v2", num_classes=21, output_stride=32)
MODES = ("eval", "train")
LR, MOMENTUM = 0.01, 0.9
# float32 through ~50 layers: XLA and oneDNN sum in different orders (tests/_zoo_checks.py
# measures up to ~1e-6 in eval mode; train-mode BatchNorm amplifies roundoff). A wrong
# weight, layout or statistic gives errors of order 1.
EVAL_RTOL, LOSS_RTOL = 1e-4, 1e-3


def build_torch(name: str) -> torch.nn.Module:
    """The upstream PyTorch model for a zoo name, built by its own library's constructor."""
    origin, arch = name.split(":", 1)
    if origin == "torchvision":
        import torchvision

        return getattr(torchvision.models, arch)()
    if origin == "timm":
        import timm

        return timm.create_model(arch)
    if name == "jaxdsc:deeplabv3plus":
        from torch_bridge.nn import DeepLabV3Plus

        return DeepLabV3Plus(**DEEPLAB)
    raise ValueError(f"--models: {name!r} is not one of {', '.join(MODELS)}")


def _stochastic_off(tm: torch.nn.Module) -> torch.nn.Module:
    tm.train()
    for m in tm.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ in ("StochasticDepth", "DropPath"):
            m.eval()
    return tm


def _labels(name: str, batch: int, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    shape = (batch, size, size) if name == "jaxdsc:deeplabv3plus" else (batch,)
    return rng.integers(0, num_classes, shape).astype(np.int64)


# ----------------------------------------------------------------- JAX --


def jax_fns(model: nnx.Module, x: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[], object]]:
    """Zero-argument synchronous eval forward and train step of ``model`` (x NHWC)."""
    xj, yj = jnp.asarray(x), jnp.asarray(labels.astype(np.int32))
    model.eval()
    eval_graph, eval_state = nnx.split(model)
    eval_state = jax.tree.map(jnp.array, eval_state)  # a copy: the train step donates its buffers

    @jax.jit
    def forward(state, xx):
        return nnx.merge(eval_graph, state)(xx)

    model.train()
    model.set_attributes(deterministic=True, raise_if_not_found=False)
    graph, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = optax.sgd(LR, momentum=MOMENTUM)

    def loss_fn(p, s, xx, yy):
        # Fresh Variables at this trace level: train-mode BatchNorm writes its statistics into them.
        m = nnx.merge(graph, p, s, rest, copy=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(m(xx), yy).mean()
        return loss, nnx.state(m, nnx.BatchStat)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(p, opt, s, xx, yy):
        (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, xx, yy)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, s, loss

    state = {"p": params, "opt": tx.init(params), "s": stats}

    def run_step():
        state["p"], state["opt"], state["s"], loss = step(state["p"], state["opt"], state["s"], xj, yj)
        return loss.block_until_ready()

    return {"eval": lambda: forward(eval_state, xj).block_until_ready(), "train": run_step}


# --------------------------------------------------------------- torch --


def torch_fns(tm: torch.nn.Module, x: np.ndarray, labels: np.ndarray,
              layout: torch.memory_format) -> dict[str, Callable[[], object]]:
    """Zero-argument eval forward and train step of a copy of ``tm`` in ``layout`` (x NHWC)."""
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).contiguous(memory_format=layout)
    yt = torch.from_numpy(labels)
    ref = copy.deepcopy(tm).to(memory_format=layout).eval()
    model = _stochastic_off(copy.deepcopy(tm).to(memory_format=layout))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ce = torch.nn.functional.cross_entropy

    def forward():
        with torch.inference_mode():
            return ref(xt)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ce(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.detach()

    return {"eval": forward, "train": step}


LAYOUTS = {"torch_nchw": torch.contiguous_format, "torch_cl": torch.channels_last}


def _check_same_function(name: str, jf: dict, tf: dict, loss_rtol: float) -> dict[str, float]:
    want = tf["eval"]().numpy()
    got = np.asarray(jf["eval"]())
    if got.ndim == 4:
        got = np.moveaxis(got, -1, 1)
    eval_err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    # A step returns the loss of the parameters it started from: the first step's loss compares
    # the train-mode forward on the same weights (that step counts as warm-up).
    jl, tl = float(jf["train"]()), float(tf["train"]())
    loss_err = abs(jl - tl) / max(abs(tl), 1e-30)
    if not (eval_err <= EVAL_RTOL and loss_err <= loss_rtol):
        raise SystemExit(
            f"{name}: jaxdsc and torch disagree (eval rel err {eval_err:.2e}, limit {EVAL_RTOL}; train loss "
            f"{jl} vs {tl}, rel err {loss_err:.2e}, limit {loss_rtol}). Train-mode BatchNorm over a few "
            "values per channel (tiny --batch and --size leave 1x1 maps) amplifies float32 roundoff: "
            "a larger --batch/--size, or --loss-rtol, if only the loss differs")
    return {"eval_rel_err": eval_err, "train_loss_rel_err": loss_err, "first_loss": jl}


# ---------------------------------------------------------------- main --


def run_model(name: str, args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)  # upstream's random init: the same weights every run
    tm = build_torch(name)
    jm = torch_bridge.from_torch(tm)
    num_classes = DEEPLAB["num_classes"] if name == "jaxdsc:deeplabv3plus" else tm_num_classes(tm)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = _labels(name, args.batch, args.size, num_classes, rng)
    jf = jax_fns(jm, x, labels)
    tfs = {label: torch_fns(tm, x, labels, fmt) for label, fmt in LAYOUTS.items()}
    old = {}
    if args.also_old_dense:
        # A second model (the step donates its state), traced with "auto" choosing the dense convs'
        # implementation as before the native dense kernel; later calls reuse those traces.
        old = jax_fns(torch_bridge.from_torch(tm), x, labels)
        with _native_dense_off():
            old_eval, old_loss = np.asarray(old["eval"]()), float(old["train"]())
    errs = _check_same_function(name, jf, tfs["torch_nchw"], args.loss_rtol)
    if old:
        new_eval = np.asarray(jf["eval"]())
        eval_err = float(np.abs(old_eval - new_eval).max() / max(np.abs(new_eval).max(), 1e-30))
        loss_err = abs(old_loss - errs["first_loss"]) / max(abs(errs["first_loss"]), 1e-30)
        if not (eval_err <= EVAL_RTOL and loss_err <= args.loss_rtol):
            raise SystemExit(f"{name}: the old dense path disagrees (eval rel err {eval_err:.2e}, "
                             f"first train loss rel err {loss_err:.2e})")
    rows = []
    for mode in args.modes.split(","):
        fns = {"jaxdsc": jf[mode], **{label: tf[mode] for label, tf in tfs.items()}}
        if old:
            fns["jaxdsc_old_dense"] = old[mode]
        load0 = os.getloadavg()[0]
        res = time_interleaved(fns, rounds=args.rounds, block_s=args.block_s, warmup=args.warmup)
        ips = {k: args.batch / (t.median_ms * 1e-3) for k, t in res.items()}
        best = max(LAYOUTS, key=lambda k: ips[k])
        row = {"model": name, "mode": mode, "batch": args.batch, "size": args.size,
               "jaxdsc_ips": round(ips["jaxdsc"], 2), "torch_ips": round(ips[best], 2),
               "torch_layout": "channels_last" if best == "torch_cl" else "NCHW",
               "ratio": round(ips["jaxdsc"] / ips[best], 3), **errs,
               **({"old_dense_ips": round(ips["jaxdsc_old_dense"], 2),
                   "old_dense_ratio": round(ips["jaxdsc_old_dense"] / ips[best], 3)} if old else {}),
               "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
               "timings": {k: vars(t) for k, t in res.items()}}
        rows.append(row)
        print(f"{name:32s} {mode:5s} jaxdsc {row['jaxdsc_ips']:9.1f} img/s  torch {row['torch_ips']:9.1f} "
              f"img/s ({row['torch_layout']})  ratio {row['ratio']:.2f}"
              + (f"  (old dense: {row['old_dense_ips']:.1f} img/s, ratio {row['old_dense_ratio']:.2f})"
                 if old else ""), flush=True)
    return rows


@contextlib.contextmanager
def _native_dense_off():
    """Dense convs traced in the body take "auto"'s choice without the native dense kernel."""
    from jaxdsc.ops import native_dense

    available = native_dense.available
    native_dense.available = lambda: False
    try:
        yield
    finally:
        native_dense.available = available


def tm_num_classes(tm: torch.nn.Module) -> int:
    """Classifier width of a torchvision / timm classifier (its last Linear's output features)."""
    linears = [m for m in tm.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(tm).__qualname__}: no Linear classifier found")
    return linears[-1].out_features


def markdown(rows: list[dict]) -> str:
    lines = ["| model | mode | jaxdsc img/s | torch img/s (layout) | jaxdsc / torch |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['jaxdsc_ips']:.1f} | {r['torch_ips']:.1f} ({r['torch_layout']}) "
              f"| {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma list of zoo names")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of eval,train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-s", type=float, default=1.5, help="minimum seconds of calls per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate (after compiling)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--loss-rtol", type=float, default=LOSS_RTOL,
                   help="tolerated relative difference of the first train-mode loss")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--also-old-dense", action="store_true",
                   help="also time jaxdsc with the dense convs as before the native dense kernel "
                        "(patches for <= 7 input channels, else xla), same rounds")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.batch < 2:
        p.error(f"--batch must be >= 2 (train-mode BatchNorm needs 2 values per channel), got {args.batch}")
    torch.set_num_threads(args.threads)
    rows = [row for name in models for row in run_model(name, args)]
    print("\n" + markdown(rows))
    if args.json:
        write_results(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
