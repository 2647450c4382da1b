"""TCN speed (issue 17): jaxdsc's TCN against its PyTorch twin, separable and dense, forward and train step.

For each length ``T`` (default 1000 and 4096) and each conv kind (separable:
depthwise dilated causal + pointwise; dense: the paper's conv), one
``jaxdsc.models.TCN`` with ``--levels`` levels (dilation up to
``2**(levels-1)``, 512 by default) of ``--channels`` channels, and its twin
``torch_bridge.to_torch(model)`` (channels-first, the same weights), are timed
in one process, interleaved (``benchmarks/_harness.py``):

* ``forward``: inference (JAX ``nnx.jit``; torch ``no_grad``, eval mode);
* ``step``: loss (mean square of the output), backward and an SGD update
  (JAX: one jitted pure function with donated state; torch: zero_grad,
  forward, backward, ``optimizer.step``).

``--presets adding,copy,...`` times instead the trainer's sequence presets
(``python -m train --preset NAME``) and their ``-dense`` references at their
own widths, batch and length (music: the median padded batch length of a
training epoch), train step only, reporting sequences/s of both sides: the
PyTorch reference for the training table (dropout off on both sides, SGD
instead of the presets' Adam: the optimizer is a negligible part of a step).

The allocator matters at T=4096 (activation buffers of megabytes, faulted in
page by page on every call when glibc hands them back): run it both ways, out of
the box and with the trainer's setting (``train.malloc``) through
``GLIBC_TUNABLES`` (the JSON records which), on both sides alike.

Before timing, forward outputs and one step's loss are compared, so both
sides compute the same function. Reported: medians over rounds (ms), and the
ratio jaxdsc / torch (< 1: jaxdsc faster).

    python benchmarks/tcn.py                                   # full (minutes; run on a quiet CPU)
    GLIBC_TUNABLES=$NOPF2 python benchmarks/tcn.py             # the trainer's allocator setting, where
    # NOPF2=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1
    python benchmarks/tcn.py --lengths 64 --levels 3 --rounds 2 --block-s 0.02   # smoke
    python benchmarks/tcn.py --presets adding,copy,music-jsb,music-nottingham   # the training presets
    python benchmarks/tcn.py --kinds dense --also-policy xla   # also the reference kernels, same rounds
"""

from __future__ import annotations

import argparse
import sys
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
from jaxdsc.models import TCN
from jaxdsc.ops import impl_policy

# Length at which a preset's step is timed: the generated tasks' T (copy: 1000 blanks + 20), and for the
# music sets the median padded length of a training epoch's batches of 8 (train.seq_loop buckets them).
PRESET_LENGTH = {"adding": 600, "copy": 1020, "music-jsb": 104, "music-nottingham": 448}


def _case(t: int, kind: str, fin: int, fout: int, channels: list[int], k: int, batch: int,
          label: str = "", dense_stem: bool = False, last: bool = False) -> dict:
    return {"T": t, "kind": kind, "fin": fin, "fout": fout, "channels": channels, "k": k, "batch": batch,
            "label": label, "dense_stem": dense_stem, "last": last}


def _cases(args: argparse.Namespace) -> list[dict]:
    if not args.presets:
        c = args.channels
        return [_case(int(t), kind, c, c, [c] * args.levels, args.kernel_size, args.batch)
                for t in args.lengths.split(",") for kind in args.kinds.split(",")]
    from train.config import PRESETS
    from train.seq_loop import task_features

    cases = []
    for name in args.presets.split(","):
        if name not in PRESET_LENGTH:
            raise SystemExit(f"--presets: {name!r} is not a sequence preset; expected some of {sorted(PRESET_LENGTH)}")
        for label in (name, name + "-dense"):
            cfg = PRESETS[label]
            cases.append(_case(PRESET_LENGTH[name], "separable" if cfg.model.separable else "dense",
                               *task_features(cfg.data.task), list(cfg.model.channels), cfg.model.kernel_size,
                               cfg.optim.batch_size, label, cfg.model.dense_stem,
                               # as the trainer: the adding loss reads the last step only (TCN.last, both sides)
                               last=cfg.data.task == "adding"))
    return cases


def _models(case: dict) -> tuple[TCN, torch.nn.Module]:
    m = TCN(case["fin"], case["fout"], case["channels"], kernel_size=case["k"], separable=case["kind"] == "separable",
            dense_stem=case["dense_stem"], rngs=nnx.Rngs(0))
    return m, torch_bridge.to_torch(m)


def _jax_fns(model: TCN, x: np.ndarray, lr: float, last: bool = False):
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(p, xx):
        m = nnx.merge(graph, p, rest)
        return m.last(xx) if last else m(xx)
    tx = optax.sgd(lr)
    xj = jnp.asarray(x)

    @jax.jit
    def forward(params, xx):
        return apply(params, xx)

    @jax.jit
    def step(params, opt_state, xx):
        def loss_fn(p):
            return jnp.mean(jnp.square(apply(p, xx)))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"params": params, "opt": tx.init(params)}

    def run_step():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], xj)
        return loss.block_until_ready()

    fwd_params = jax.tree.map(jnp.array, params)
    return (lambda: forward(fwd_params, xj).block_until_ready()), run_step, forward(fwd_params, xj), step(
        jax.tree.map(jnp.array, params), tx.init(params), xj)[2]


def _torch_fns(twin: torch.nn.Module, x: np.ndarray, lr: float, last: bool = False):
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    ref = torch_bridge.to_torch(torch_bridge.from_torch(twin)).eval()  # a frozen copy for the forward
    opt = torch.optim.SGD(twin.parameters(), lr=lr)
    fwd, twin_fwd = (ref.last, twin.last) if last else (ref, twin)

    def forward():
        with torch.no_grad():
            return fwd(xt)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = twin_fwd(xt).square().mean()
        loss.backward()
        opt.step()
        return loss

    with torch.no_grad():
        y = fwd(xt).numpy() if last else np.moveaxis(ref(xt).numpy(), 1, -1)
        first_loss = float(twin_fwd(xt).square().mean())
    return forward, step, y, first_loss


def _under(policy: str, fn):
    with impl_policy(policy):
        return fn()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1000,4096", help="comma list of T")
    p.add_argument("--kinds", default="separable,dense")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--levels", type=int, default=10, help="levels; dilation up to 2**(levels-1)")
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-s", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--presets", default="", help="comma list of sequence presets to time instead (train step)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--also-policy", default="", choices=["", "xla", "shift", "native"],
                   help="also time jaxdsc traced under this jaxdsc.ops.impl_policy, in the same rounds "
                        "(xla: the reference kernels; a before/after check of a kernel)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lr = 1e-3
    rows = []
    for case in _cases(args):
        t, kind = case["T"], case["kind"]
        x = np.random.default_rng(t).standard_normal((case["batch"], t, case["fin"])).astype(np.float32)
        model, twin = _models(case)
        jf, js, jy, jloss = _jax_fns(model, x, lr, case["last"])
        tf, ts, ty, tloss = _torch_fns(twin, x, lr, case["last"])
        err = float(np.abs(np.asarray(jy) - ty).max() / max(np.abs(ty).max(), 1e-30))
        if err > 1e-4 or abs(float(jloss) - tloss) > 1e-4 * max(abs(tloss), 1e-30):
            raise SystemExit(f"T={t} {kind}: JAX and torch disagree (rel err {err:.2e}, "
                             f"loss {float(jloss)} vs {tloss})")
        modes = (("step", {"jax": js, "torch": ts}),) if case["label"] else (
            ("forward", {"jax": jf, "torch": tf}), ("step", {"jax": js, "torch": ts}))
        if args.also_policy:
            # Traced and run under the policy (part of jit's cache key: every call inside it).
            with impl_policy(args.also_policy):
                pf, ps, py, _ = _jax_fns(model, x, lr, case["last"])
            if float(np.abs(np.asarray(py) - ty).max()) > 1e-4 * max(np.abs(ty).max(), 1e-30):
                raise SystemExit(f"T={t} {kind}: policy {args.also_policy} disagrees with torch")
            extra = {"forward": pf, "step": ps}
            for mode, fns in modes:
                fns["policy"] = lambda f=extra[mode]: _under(args.also_policy, f)
        for mode, fns in modes:
            res = time_interleaved(fns, rounds=args.rounds, block_s=args.block_s)
            jms, tms = res["jax"].median_ms, res["torch"].median_ms
            row = {"T": t, "kind": kind, "mode": mode, "jax_ms": round(jms, 3), "torch_ms": round(tms, 3),
                   "ratio": round(jms / tms, 3)}
            if "policy" in res:
                pms = res["policy"].median_ms
                row.update(policy=args.also_policy, policy_ms=round(pms, 3), policy_ratio=round(pms / tms, 3))
            if case["label"]:
                row.update(preset=case["label"], batch=case["batch"],
                           params=sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))),
                           jax_seq_per_s=round(1e3 * case["batch"] / jms, 1),
                           torch_seq_per_s=round(1e3 * case["batch"] / tms, 1))
            rows.append(row)
            print(f"T={t:5d} {case['label'] or kind:22s} {mode:7s} jaxdsc {row['jax_ms']:9.2f} ms  torch "
                  f"{row['torch_ms']:9.2f} ms  ratio {row['ratio']:.2f}"
                  + (f"  (policy {row['policy']}: {row['policy_ms']:.2f} ms, ratio {row['policy_ratio']:.2f})"
                     if "policy" in row else ""), flush=True)
    if args.presets:
        print("\n| preset | convs | params | T | batch | jaxdsc seq/s | PyTorch seq/s | jaxdsc / PyTorch time |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['preset']} | {r['kind']} | {r['params']:,} | {r['T']} | {r['batch']} | {r['jax_seq_per_s']} "
                  f"| {r['torch_seq_per_s']} | {r['ratio']} |")
    else:
        print("\n| T | conv | mode | jaxdsc ms | PyTorch ms | jaxdsc / PyTorch |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['T']} | {r['kind']} | {r['mode']} | {r['jax_ms']} | {r['torch_ms']} | {r['ratio']} |")
    if args.json:
        write_results(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
