"""BENCHMARKS.md rows of the 30-minute CPU CIFAR-10 benchmark (issues 3, 16) from trainer workdirs.

    python benchmarks/summarize_cifar.py --jax runs/s0 runs/s1 runs/s2 --torch runs/torchref [--curve]

``--jax``: one or more ``python -m train`` workdirs (``summary.json``,
``metrics.jsonl``, ``config.json``; e.g. the seeds of one recipe);
``--torch``: a ``train/scripts/torch_reference.py`` workdir
(``torch_summary.json``, ``torch_metrics.jsonl``). Prints the markdown table
rows: final test accuracy (with the run's test-time augmentation, and without),
time to 85% / 90% / 91% (training seconds at the first end-of-epoch evaluation
reaching it; evaluation time not counted, the first step's compilation
counted), training time, steady-state images/s and the images/s ratio
jaxdsc / PyTorch; with several runs, a mean row. A torch run shorter than the
JAX one (e.g. one epoch, for its speed only) gets its accuracy columns left
empty. ``--curve`` adds the per-epoch test accuracy of the first run and torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _secs(v: float | None, reached: bool = True) -> str:
    if v is None:
        return "not reached" if reached else "-"
    return f"{v:.0f} s ({v / 60:.1f} min)"


def load_jax(workdir: Path) -> dict[str, Any]:
    summary = json.loads((workdir / "summary.json").read_text())
    cfg = json.loads((workdir / "config.json").read_text())
    return {"summary": summary, "config": cfg, "records": _read_jsonl(workdir / "metrics.jsonl")}


def load_torch(workdir: Path) -> dict[str, Any]:
    return {"summary": json.loads((workdir / "torch_summary.json").read_text()),
            "records": _read_jsonl(workdir / "torch_metrics.jsonl")}


TARGETS = (85, 90, 91)


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def rows(jax_runs: list[dict[str, Any]], torch_run: dict[str, Any] | None) -> str:
    t_ips = torch_run["summary"]["images_per_second"] if torch_run else None
    lines = [
        "| run | model, schedule | seed | test acc (no TTA) | "
        + " | ".join(f"time to {p}%" for p in TARGETS)
        + " | train time | img/s | jaxdsc / torch img/s | load 1/5/15 min (end) |",
        "|---|---|---|---|" + "---|" * len(TARGETS) + "---|---|---|---|",
    ]
    for run in jax_runs:
        s, c = run["summary"], run["config"]
        o = c["optim"]
        sched = (f"{o['epochs']} ep, batch {o['batch_size']}, {o['optimizer']} lr {o['lr']} {o['schedule']}, "
                 f"wd {o['weight_decay']}, ls {o['label_smoothing']}, TTA {s.get('tta', 'none')}")
        d, m = c.get("data", {}), c.get("model", {})
        if d.get("train_sizes"):
            sched += f", train sizes {'-'.join(map(str, d['train_sizes']))}"
        if m.get("stem_init", "random") != "random":
            sched += f", {m['stem_init']} stem"
        macs = f", {s['macs'] / 1e6:.1f}M MACs" if s.get("macs") else ""
        load = "/".join(f"{v:.1f}" for v in s.get("loadavg", [])) or "?"
        ratio = f"**{s['images_per_second'] / t_ips:.2f}**" if t_ips else "-"
        times = " | ".join(_secs(s.get(f"time_to_{p}")) for p in TARGETS)
        lines.append(
            f"| jaxdsc `python -m train` | {s['model']} ({s['params']} params{macs}), {sched} | {c['run']['seed']} | "
            f"{_pct(s['test_accuracy'])} ({_pct(s.get('test_accuracy_no_tta', s['test_accuracy']))}) | {times} | "
            f"{_secs(s['train_seconds'])} | {s['images_per_second']:.0f} | {ratio} | {load} |")
    if len(jax_runs) > 1:
        ss = [r["summary"] for r in jax_runs]
        acc = _mean([s["test_accuracy"] for s in ss])
        plain = _mean([s.get("test_accuracy_no_tta", s["test_accuracy"]) for s in ss])
        times = " | ".join(_secs(_mean([s.get(f"time_to_{p}") for s in ss])) for p in TARGETS)
        ips = _mean([s["images_per_second"] for s in ss])
        ratio = f"**{ips / t_ips:.2f}**" if t_ips and ips else "-"
        lines.append(f"| **mean of {len(ss)}** | | | **{_pct(acc)}** ({_pct(plain)}) | {times} | "
                     f"{_secs(_mean([s['train_seconds'] for s in ss]))} | {ips:.0f} | {ratio} | |")
    if torch_run:
        t = torch_run["summary"]
        full = t.get("epochs", 0) >= jax_runs[0]["config"]["optim"]["epochs"]
        what = f"{t.get('layout', 'nchw')}, {t.get('threads', '?')} threads, {t.get('epochs')} ep"
        times = " | ".join(_secs(t.get(f"time_to_{p}"), full) for p in TARGETS)
        lines.append(
            f"| PyTorch `torch_reference.py` ({what}) | {t.get('model', '')}, same schedule | "
            f"{jax_runs[0]['config']['run']['seed']} | {_pct(t['test_accuracy']) if full else '-'} | {times} | "
            f"{_secs(t.get('train_seconds')) if full else '-'} | {t_ips:.0f} | 1 | - |")
    return "\n".join(lines) + "\n"


def curve(jax_run: dict[str, Any], torch_run: dict[str, Any] | None) -> str:
    trecs = {r["epoch"]: r for r in (torch_run or {}).get("records", [])}
    lines = ["| epoch | jaxdsc test acc | jaxdsc train s | jaxdsc img/s | torch test acc | torch train s |",
             "|---|---|---|---|---|---|"]
    for r in jax_run["records"]:
        t = trecs.get(r["epoch"], {})
        lines.append(f"| {r['epoch']} | {_pct(r['test_accuracy'])} | {r['train_seconds']:.0f} | "
                     f"{r['images_per_second']:.0f} | {_pct(t.get('test_accuracy'))} | "
                     f"{t['train_seconds']:.0f} |" if t else
                     f"| {r['epoch']} | {_pct(r['test_accuracy'])} | {r['train_seconds']:.0f} | "
                     f"{r['images_per_second']:.0f} | - | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jax", type=Path, nargs="+", required=True, help="workdirs of python -m train")
    ap.add_argument("--torch", type=Path, help="workdir of train/scripts/torch_reference.py")
    ap.add_argument("--curve", action="store_true", help="also the per-epoch test accuracy")
    args = ap.parse_args(argv)
    try:
        jax_runs = [load_jax(w) for w in args.jax]
        torch_run = load_torch(args.torch) if args.torch else None
    except (OSError, json.JSONDecodeError) as e:
        print(f"summarize_cifar: error: {e}", file=sys.stderr)
        return 2
    print(rows(jax_runs, torch_run))
    if args.curve:
        print(curve(jax_runs[0], torch_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
