"""Layer benchmark for issue 5: jaxdsc vs PyTorch vs plain Flax, one process, interleaved.

Depthwise, pointwise and separable (depthwise then pointwise) conv, forward
and forward+backward (gradients w.r.t. the input and every weight), on the
issue's shapes. Candidates per row:

* ``jaxdsc``: ``depthwise_conv(impl="auto")`` (+ ``pointwise_conv``), i.e. the
  native C++ kernel on CPU when built, else the pure-JAX shift path;
  For sep: ``jaxdsc.ops.separable_conv``, whose forward is one fused native
  kernel on CPU (the depthwise rows stay in cache for the pointwise GEMM);
* ``jaxdsc_unfused`` (sep): ``pointwise_conv(depthwise_conv(x))``, the two
  layers one after the other (the path before the fused forward);
* ``jaxdsc_shift``: the pure-JAX path forced (``impl="shift"``);
* ``jaxdsc_pwxla`` (pw, sep): as ``jaxdsc`` but the pointwise conv forced to
  ``impl="xla"`` (XLA's GEMM, the path before the native GEMM);
* ``flax``: plain ``flax.nnx.Conv(feature_group_count=C)`` (and ``nnx.Conv``
  1x1 for the pointwise part), what a Flax user writes today;
* ``torch_nchw`` / ``torch_cl``: ``torch.nn.functional.conv2d`` on contiguous
  NCHW and on channels_last tensors (oneDNN on CPU).

Prints markdown tables (times, ratios vs the faster PyTorch layout and vs
flax, GB/s and GFLOP/s next to a measured roofline) and writes JSON. State
the allocator setting with the results (see BENCHMARKS.md). Usage::

    python benchmarks/layers.py --json /tmp/layers.json
    python benchmarks/layers.py --kinds dw --modes fwd --shapes c64_d1 --no-flax
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _harness import env_info, roofline_probe, stream_reference, time_interleaved
from flax import nnx

from jaxdsc.ops import depthwise_conv, pointwise_conv, select_impl, separable_conv
from jaxdsc.ops.depthwise import make_call
from jaxdsc.ops.pointwise import select_pointwise_impl

# Not candidates: the same bytes streamed in place (the probe's best rate) and
# copied (a conv forward's pattern), timed in the same rounds as the depthwise
# forward (see _harness.stream_reference).
STREAM = "stream_same_bytes"
COPY = "copy_same_bytes"


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    hw: int
    c: int
    k: int
    d: int
    s: int = 1

    @property
    def pad(self) -> int:  # PyTorch-style symmetric padding, "SAME" for stride 1
        return self.d * (self.k - 1) // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.d * (self.k - 1) - 1) // self.s + 1


SHAPES = [
    Shape("c64_d1", 128, 32, 64, 3, 1),
    Shape("c128_d2", 128, 32, 128, 3, 2),
    Shape("c256_d4", 64, 16, 256, 3, 4),
    Shape("c32_k5_d2", 32, 64, 32, 5, 2),
    Shape("c64_s2", 128, 32, 64, 3, 1, 2),
    Shape("c128_s2", 128, 32, 128, 3, 1, 2),
]
KINDS = ("dw", "pw", "sep")
MODES = ("fwd", "fwdbwd")


def traffic(shape: Shape, kind: str, mode: str) -> tuple[float, float]:
    """(bytes, flops) of one call: float32 tensors read + written once, no fusion.

    The pointwise conv maps C -> C on the depthwise output size. Forward plus
    backward counts three passes (forward, input gradient, weight gradient).
    """
    n, c = shape.n, shape.c
    pin, pout = n * shape.hw**2, n * shape.out_hw**2
    dw = (4.0 * c * (pin + pout), 2.0 * shape.k**2 * pout * c)
    pw = (4.0 * pout * 2 * c, 2.0 * pout * c * c)
    b, f = {"dw": dw, "pw": pw, "sep": (dw[0] + pw[0], dw[1] + pw[1])}[kind]
    return (3 * b, 3 * f) if mode == "fwdbwd" else (b, f)


# ----------------------------------------------------------------- JAX --


def _jax_callable(f, args, mode: str):
    """Zero-arg synchronous call of jitted f(*args) (fwd) or its full VJP (fwdbwd)."""
    if mode == "fwd":
        run = jax.jit(f)
    else:

        def both(*a):
            y, vjp = jax.vjp(f, *a)
            return (y, *vjp(y))

        run = jax.jit(both)
    return lambda: jax.block_until_ready(run(*args))


def jax_candidates(
    shape: Shape, kind: str, mode: str, with_flax: bool, rng, pw_xla: bool = True
) -> dict:
    s, p, d, k, c = shape.s, shape.pad, shape.d, shape.k, shape.c
    hw = shape.hw if kind != "pw" else shape.out_hw
    x = jnp.asarray(rng.standard_normal((shape.n, hw, hw, c)), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((k, k, 1, c)) / k, jnp.float32)
    wp = jnp.asarray(rng.standard_normal((c, c)) / np.sqrt(c), jnp.float32)
    conv_args = dict(strides=(s, s), padding=((p, p), (p, p)), dilation=(d, d))

    def dw(impl):
        return lambda x, wd: depthwise_conv(x, wd, impl=impl, **conv_args)

    out = {}
    for label, impl in (("jaxdsc", "auto"), ("jaxdsc_shift", "shift")):
        if kind == "dw":
            out[label] = _jax_callable(dw(impl), (x, wd), mode)
        elif kind == "sep":
            sep = functools.partial(separable_conv, impl=impl, **conv_args)
            out[label] = _jax_callable(lambda x, wd, wp, sep=sep: sep(x, wd, wp), (x, wd, wp), mode)
        elif impl == "auto":
            out[label] = _jax_callable(pointwise_conv, (x, wp), mode)
    if kind == "sep" and pw_xla:
        # The two layers one after the other (no fused forward), for before/after in one run.
        f = dw("auto")
        out["jaxdsc_unfused"] = _jax_callable(
            lambda x, wd, wp: pointwise_conv(f(x, wd), wp), (x, wd, wp), mode
        )
    if kind in ("pw", "sep") and pw_xla:
        # The previous pointwise path (XLA's GEMM), for before/after in one run.
        f = dw("auto")
        pw_x = functools.partial(pointwise_conv, impl="xla")
        out["jaxdsc_pwxla"] = (
            _jax_callable(pw_x, (x, wp), mode)
            if kind == "pw"
            else _jax_callable(lambda x, wd, wp: pw_x(f(x, wd), wp), (x, wd, wp), mode)
        )
    if with_flax:
        rngs = nnx.Rngs(0)
        layers = []
        if kind in ("dw", "sep"):
            layers.append(
                nnx.Conv(c, c, (k, k), strides=s, padding=[(p, p), (p, p)], kernel_dilation=d,
                         feature_group_count=c, use_bias=False, rngs=rngs)
            )  # fmt: skip
        if kind in ("pw", "sep"):
            layers.append(nnx.Conv(c, c, (1, 1), use_bias=False, rngs=rngs))
        graphdef, params = nnx.split(nnx.Sequential(*layers))
        out["flax"] = _jax_callable(
            lambda x, params: nnx.merge(graphdef, params)(x), (x, params), mode
        )
    return out


# --------------------------------------------------------------- torch --


def torch_candidates(shape: Shape, kind: str, mode: str, device: str, rng) -> dict:
    s, p, d, k, c = shape.s, shape.pad, shape.d, shape.k, shape.c
    hw = shape.hw if kind != "pw" else shape.out_hw
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x0 = torch.from_numpy(rng.standard_normal((shape.n, c, hw, hw)).astype(np.float32)).to(device)
    wd0 = torch.from_numpy((rng.standard_normal((c, 1, k, k)) / k).astype(np.float32)).to(device)
    wp0 = torch.from_numpy((rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)).to(
        device
    )
    F = torch.nn.functional

    def fn(x, wd, wp):
        if kind in ("dw", "sep"):
            x = F.conv2d(x, wd, stride=s, padding=p, dilation=d, groups=c)
        if kind in ("pw", "sep"):
            x = F.conv2d(x, wp)
        return x

    out = {}
    for label, fmt in (("torch_nchw", torch.contiguous_format), ("torch_cl", torch.channels_last)):
        x, wd, wp = (t.contiguous(memory_format=fmt) for t in (x0, wd0, wp0))
        if mode == "fwd":

            def call(x=x, wd=wd, wp=wp):
                with torch.inference_mode():
                    fn(x, wd, wp)
                sync()

        else:
            x, wd, wp = (t.clone().requires_grad_(True) for t in (x, wd, wp))
            wrt = [x] + ([wd] if kind != "pw" else []) + ([wp] if kind != "dw" else [])

            def call(x=x, wd=wd, wp=wp, wrt=wrt):
                y = fn(x, wd, wp)
                torch.autograd.grad(y, wrt, y)
                sync()

        out[label] = call
    return out


# ---------------------------------------------------------------- main --


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = {"env": env_info(), "args": vars(args), "rows": []}
    if not args.no_roofline:
        results["roofline"] = roofline_probe(args.device)
        print(
            "roofline:",
            json.dumps({k: round(v, 1) for k, v in results["roofline"].items()}),
            flush=True,
        )
    for shape in [sh for sh in SHAPES if args.shapes == "all" or sh.name in args.shapes.split(",")]:
        x = jnp.zeros((1, shape.hw, shape.hw, shape.c))
        call = make_call(x, jnp.zeros((shape.k, shape.k, 1, shape.c)), strides=(shape.s,) * 2,
                         padding=((shape.pad,) * 2,) * 2, dilation=(shape.d,) * 2)  # fmt: skip
        auto = select_impl(call, "auto")
        y = jnp.zeros((shape.n, shape.out_hw, shape.out_hw, shape.c))
        pw_auto = select_pointwise_impl(y, jnp.zeros((shape.c, shape.c)), None, "auto")
        for kind in args.kinds.split(","):
            for mode in args.modes.split(","):
                fns = jax_candidates(
                    shape, kind, mode, not args.no_flax, rng, pw_xla=not args.no_pw_xla
                )
                fns.update(torch_candidates(shape, kind, mode, args.device, rng))
                nbytes, flops = traffic(shape, kind, mode)
                if (kind, mode) == ("dw", "fwd") and args.device == "cpu" and not args.no_roofline:
                    fns[STREAM] = stream_reference(nbytes, "inplace")
                    fns[COPY] = stream_reference(nbytes, "copy")
                load0 = os.getloadavg()[0]
                t = time_interleaved(fns, rounds=args.rounds, block_s=args.block_s)
                row = {"shape": asdict(shape), "kind": kind, "mode": mode, "auto_impl": auto, "pw_impl": pw_auto,
                       "bytes": nbytes, "flops": flops, "loadavg": (load0, os.getloadavg()[0]),
                       "timings": {k: asdict(v) for k, v in t.items()}}  # fmt: skip
                results["rows"].append(row)
                med = {k: v.median_ms for k, v in t.items()}
                best_torch = min(med["torch_nchw"], med["torch_cl"])
                print(
                    f"{shape.name:10s} {kind:3s} {mode:6s} "
                    + " ".join(f"{k}={v:.3f}" for k, v in med.items())
                    + f" | jaxdsc/best_torch={med['jaxdsc'] / best_torch:.2f}"
                    + (f" flax/jaxdsc={med['flax'] / med['jaxdsc']:.1f}" if "flax" in med else "")
                    + f" load={load0:.1f}",
                    flush=True,
                )
    return results


def markdown(results: dict) -> str:
    roof = results.get("roofline", {})
    bw, peak = roof.get("bandwidth_GBps"), roof.get("peak_GFLOPps")
    lines = []
    for kind in KINDS:
        for mode in MODES:
            rows = [r for r in results["rows"] if r["kind"] == kind and r["mode"] == mode]
            if not rows:
                continue
            names = list(rows[0]["timings"])
            lines += [
                f"\n**{kind} {mode}** (median ms; ratio = jaxdsc / faster PyTorch layout; "
                "flax/jaxdsc = speed-up over plain nnx.Conv)\n",
                "| shape | "
                + " | ".join(names)
                + " | jaxdsc / best torch | flax / jaxdsc | jaxdsc GB/s | GFLOP/s | % roofline | load |",
                "|---|" + "---|" * (len(names) + 6),
            ]
            for r in rows:
                med = {k: v["median_ms"] for k, v in r["timings"].items()}
                best_torch = min(med["torch_nchw"], med["torch_cl"])
                sec = med["jaxdsc"] * 1e-3
                roof_s = (
                    max(r["bytes"] / (bw * 1e9), r["flops"] / (peak * 1e9)) if bw else float("nan")
                )
                sh = r["shape"]
                pw_impl = r.get("pw_impl", "dot_general")
                impl = (
                    pw_impl
                    if kind == "pw"
                    else f"dw {r['auto_impl']}"
                    + (f", pw {pw_impl}" if kind == "sep" and "pw_impl" in r else "")
                )
                label = f"{sh['name']} (N{sh['n']} {sh['hw']}² C{sh['c']} k{sh['k']} d{sh['d']} s{sh['s']}; {impl})"
                flax = f"{med['flax'] / med['jaxdsc']:.1f}x" if "flax" in med else "-"
                lines.append(
                    f"| {label} | "
                    + " | ".join(f"{med[n]:.2f}" for n in names)
                    + f" | **{med['jaxdsc'] / best_torch:.2f}** | {flax} | {r['bytes'] / sec / 1e9:.1f}"
                    + f" | {r['flops'] / sec / 1e9:.1f} | {100 * roof_s / sec:.0f}% | {r['loadavg'][0]:.1f} |"
                )
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    """One line per shape: the issue's goals (ratios of medians from this run)."""
    roof = results.get("roofline", {})
    bw = roof.get("bandwidth_GBps", float("nan"))
    rows = {(r["shape"]["name"], r["kind"], r["mode"]): r for r in results["rows"]}

    def ratio(name: str, kind: str, mode: str, versus: str) -> str:
        r = rows.get((name, kind, mode))
        if r is None:
            return "-"
        med = {k: v["median_ms"] for k, v in r["timings"].items()}
        if versus == "torch":
            # Medians, and in brackets the same ratio of per-round minima: on
            # a shared CPU the minima are the least disturbed rounds.
            low = {k: v["min_ms"] for k, v in r["timings"].items()}
            by_med = med["jaxdsc"] / min(med["torch_nchw"], med["torch_cl"])
            by_min = low["jaxdsc"] / min(low["torch_nchw"], low["torch_cl"])
            return f"{by_med:.2f} ({by_min:.2f})"
        return f"{med['flax'] / med['jaxdsc']:.0f}x" if "flax" in med else "-"

    lines = [
        f"\nGoals (measured bandwidth {bw:.0f} GB/s): jaxdsc / best PyTorch (<= 1.0 wanted; "
        "medians, in brackets minima), "
        "plain flax / jaxdsc (>= 10x wanted on depthwise), depthwise fwd time / bandwidth bound "
        "at the probe's bandwidth, and (last two columns) at the rate of the same bytes streamed "
        "in place and copied in the same rounds\n",
        "| shape | dw fwd | dw fwd+bwd | pw fwd | pw fwd+bwd | sep fwd | sep fwd+bwd "
        "| flax/jaxdsc dw fwd | flax/jaxdsc dw fwd+bwd | dw fwd vs bound "
        "| dw fwd vs same-time in-place stream | dw fwd vs same-time copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(k[0] for k in rows):
        cells = [ratio(name, k, m, "torch") for k in KINDS for m in MODES]
        cells += [ratio(name, "dw", m, "flax") for m in MODES]
        r = rows.get((name, "dw", "fwd"))
        bound = "-"
        if r is not None and bw == bw:
            bound = f"{r['timings']['jaxdsc']['median_ms'] * 1e-3 / (r['bytes'] / (bw * 1e9)):.2f}x"
        same = {STREAM: "-", COPY: "-"}
        t = {k: v["median_ms"] for k, v in r["timings"].items()} if r is not None else {}
        for ref in same:
            if ref in t:
                same[ref] = f"{t['jaxdsc'] / t[ref]:.2f}x ({r['bytes'] / (t[ref] * 1e6):.0f} GB/s)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {bound} | {same[STREAM]} | {same[COPY]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="all", help="comma list of shape names, or 'all'")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block-s", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device")
    ap.add_argument("--no-flax", action="store_true", help="skip plain nnx.Conv (slow on CPU)")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument(
        "--no-pw-xla",
        action="store_true",
        help="skip jaxdsc_pwxla (pointwise forced to XLA's GEMM)",
    )
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--from-json", type=Path, help="only rebuild the tables from an earlier --json")
    args = ap.parse_args()
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    table = summary(results) + markdown(results)
    print(table)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
