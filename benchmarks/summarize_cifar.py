"""BENCHMARKS.md rows of the 30-minute CPU CIFAR-10 benchmark (issue 3) from two workdirs.

    python benchmarks/summarize_cifar.py --jax runs/c10cpu --torch runs/torchref [--curve]

``--jax``: a ``python -m train`` workdir (``summary.json``, ``metrics.jsonl``,
``config.json``); ``--torch``: a ``train/scripts/torch_reference.py`` workdir
(``torch_summary.json``, ``torch_metrics.jsonl``). Prints the markdown table
rows: best and final test accuracy, time to 80% / 90% (training seconds at the
first end-of-epoch evaluation reaching it; evaluation time not counted, the
first step's compilation counted), training time, steady-state images/s, and
the images/s ratio jaxdsc / PyTorch. A torch run shorter than the JAX one
(e.g. one epoch, for its speed only) gets its accuracy columns left empty.
``--curve`` adds the per-epoch test accuracy of both.
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


def rows(jax_run: dict[str, Any], torch_run: dict[str, Any] | None) -> str:
    s, c = jax_run["summary"], jax_run["config"]
    o = c["optim"]
    sched = (f"{o['epochs']} ep, batch {o['batch_size']}, {o['optimizer']} lr {o['lr']} {o['schedule']}, "
             f"wd {o['weight_decay']}, ls {o['label_smoothing']}")
    load = "/".join(f"{v:.1f}" for v in s.get("loadavg", [])) or "?"
    t_ips = torch_run["summary"]["images_per_second"] if torch_run else None
    ratio = f"**{s['images_per_second'] / t_ips:.2f}**" if t_ips else "-"
    lines = [
        "| run | model, schedule | best test acc | final test acc | time to 80% | time to 90% | train time | "
        "img/s | jaxdsc / torch img/s | load 1/5/15 min (end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| jaxdsc `python -m train` | {s['model']} ({s['params']} params), {sched} | "
        f"{_pct(s['best_test_accuracy'])} | {_pct(s['test_accuracy'])} | {_secs(s['time_to_80'])} | "
        f"{_secs(s['time_to_90'])} | {_secs(s['train_seconds'])} | {s['images_per_second']:.0f} | {ratio} | {load} |",
    ]
    if torch_run:
        t = torch_run["summary"]
        full = t.get("epochs", 0) >= o["epochs"]
        what = f"{t.get('layout', 'nchw')}, {t.get('threads', '?')} threads, {t.get('epochs')} ep"
        lines.append(
            f"| PyTorch `torch_reference.py` ({what}) | {t.get('model', s['model'])}, same schedule | "
            f"{_pct(t.get('best_test_accuracy', t['test_accuracy'])) if full else '-'} | "
            f"{_pct(t['test_accuracy']) if full else '-'} | "
            f"{_secs(t.get('time_to_80'), full)} | {_secs(t.get('time_to_90'), full)} | "
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
    ap.add_argument("--jax", type=Path, required=True, help="workdir of python -m train")
    ap.add_argument("--torch", type=Path, help="workdir of train/scripts/torch_reference.py")
    ap.add_argument("--curve", action="store_true", help="also the per-epoch test accuracy")
    args = ap.parse_args(argv)
    try:
        jax_run = load_jax(args.jax)
        torch_run = load_torch(args.torch) if args.torch else None
    except (OSError, json.JSONDecodeError) as e:
        print(f"summarize_cifar: error: {e}", file=sys.stderr)
        return 2
    print(rows(jax_run, torch_run))
    if args.curve:
        print(curve(jax_run, torch_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
