"""BENCHMARKS.md table of the TCN paper's tasks (issue 17) from sequence-task trainer workdirs.

    python benchmarks/summarize_seq.py runs/adding runs/adding-dense runs/copy ... [--speed tcn-presets.json]

Each workdir is a ``python -m train --preset adding|copy|music-jsb|music-nottingham[-dense]``
run (``summary.json``, ``config.json``, ``metrics.jsonl``); a run stopped before its end (no
``summary.json``) is tabulated from its last logged epoch and marked so. Prints one row per run,
grouped by task: parameters, the test metric (music: at the best validation
epoch, as the paper reports it), the paper's TCN and LSTM figures and TCN
parameter count (Bai et al. 2018, Table 1), the training minutes (compilation
included, evaluation excluded) and when the run first matched the paper's TCN
(end-of-epoch test metric), steady-state sequences/s. ``--speed``: the JSON of
``benchmarks/tcn.py --presets ...`` measured in the same window, which adds
PyTorch's sequences/s for the same model, batch and length.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from summarize_cifar import _read_jsonl  # this directory: the scripts run as files

# Bai, Kolter, Koltun 2018, Table 1: (TCN metric, LSTM metric, TCN parameters). Lower is better on all four.
PAPER = {"adding": (5.8e-5, 0.164, 70_000), "copy": (3.5e-5, 0.0204, 16_000),
         "music-jsb": (8.10, 8.45, 300_000), "music-nottingham": (3.07, 3.29, 1_000_000)}
ORDER = list(PAPER)


def _count_params(config: dict[str, Any]) -> int:
    from flax import nnx

    from train.config import ModelConfig
    from train.seq_loop import build_tcn

    # Fields a config.json lacks (older runs) keep ModelConfig's defaults.
    m = ModelConfig(**config["model"])
    model = nnx.eval_shape(lambda: build_tcn(config["data"]["task"], m, rngs=nnx.Rngs(0)))
    return sum(p.size for p in nnx.to_flat_state(nnx.state(model, nnx.Param)).leaves)


def _stopped_summary(config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """What summary.json would say for a run stopped after its last logged epoch (no summary written)."""
    from train.seq_metrics import METRICS

    task, last = config["data"]["task"], records[-1]
    best = min(records, key=lambda r: r["valid_loss"]) if "valid_loss" in last else None
    return {"task": task, "metric": METRICS.get(task), "test_metric": (best or last)["test_loss"],
            "best_epoch": best["epoch"] if best else None, "params": _count_params(config),
            "train_seconds": last["train_seconds"], "sequences_per_second": last["sequences_per_second"],
            "epochs": last["epoch"], "stopped": f"stopped after epoch {last['epoch']} of {config['optim']['epochs']}"}


def load(workdir: Path) -> dict[str, Any]:
    config = json.loads((workdir / "config.json").read_text())
    records = _read_jsonl(workdir / "metrics.jsonl")
    if (workdir / "summary.json").is_file():
        summary = json.loads((workdir / "summary.json").read_text())
    elif records:
        summary = _stopped_summary(config, records)
    else:
        raise ValueError(f"{workdir}: no summary.json and no epoch in metrics.jsonl")
    if summary.get("task") not in PAPER:
        raise ValueError(f"{workdir}: task {summary.get('task')!r} is not a sequence task of {ORDER}")
    return {"summary": summary, "config": config, "records": records}


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v >= 1 else f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


def time_to(records: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first end-of-epoch test metric at or below ``target``."""
    return next((r["train_seconds"] for r in records if r["test_loss"] <= target), None)


def table(runs: list[dict[str, Any]], speed: list[dict[str, Any]] | None = None) -> str:
    by_preset = {r["preset"]: r for r in speed or [] if "preset" in r}
    lines = ["| task | convs | params (paper TCN) | test metric | paper TCN | paper LSTM | epochs (best) | "
             "train min | matched paper TCN at | seq/s | PyTorch seq/s (step, same window) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (ORDER.index(r["summary"]["task"]), not r["config"]["model"]["separable"])):
        s, m = run["summary"], run["config"]["model"]
        tcn, lstm, paper_params = PAPER[s["task"]]
        kind = "separable" if m["separable"] else "dense"
        extras = (", dense stem" if m["separable"] and m.get("dense_stem") else "") + (
            f", dropout {m['dropout']:g}" if m.get("dropout") else "")
        preset = s["task"] + ("" if m["separable"] else "-dense")
        sp = by_preset.get(preset)
        same = sp and sp["params"] == s["params"]  # only a timing of this very model counts
        torch = f"{sp['torch_seq_per_s']:.0f} (jaxdsc {sp['jax_seq_per_s']:.0f})" if same else "-"
        reached = time_to(run["records"], tcn)
        best = f" ({s['best_epoch']})" if s.get("best_epoch") else ""
        metric = f"**{_fmt(s['test_metric'])}**" if s["test_metric"] <= tcn else _fmt(s["test_metric"])
        lines.append(
            f"| {s['task']} ({s['metric']}) | {kind} {m['channels'][0]} x {len(m['channels'])}, k{m['kernel_size']}{extras} | "
            f"{s['params']:,} ({paper_params // 1000}K) | {metric} | {_fmt(tcn)} | {_fmt(lstm)} | "
            f"{s['epochs']:g}{best}{' (' + s['stopped'] + ')' if s.get('stopped') else ''} | "
            f"{s['train_seconds'] / 60:.1f} | "
            f"{'-' if reached is None else f'{reached / 60:.1f} min'} | {s['sequences_per_second']:.0f} | {torch} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdirs", type=Path, nargs="+", help="workdirs of python -m train --preset <sequence task>")
    ap.add_argument("--speed", type=Path, help="JSON of benchmarks/tcn.py --presets, same window")
    args = ap.parse_args(argv)
    try:
        runs = [load(w) for w in args.workdirs]
        speed = json.loads(args.speed.read_text())["rows"] if args.speed else None
    except (OSError, ValueError, KeyError) as e:
        print(f"summarize_seq: error: {e}", file=sys.stderr)
        return 2
    print(table(runs, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
