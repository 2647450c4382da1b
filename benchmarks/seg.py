"""Segmentation, separable vs regular (issue 18): four trainer runs on shapes-seg, one table.

Runs ``python -m train`` one after the other (never side by side: they would share the cores)
for DeepLabV3+ with a separable and a regular ASPP + decoder (``--preset shapes-seg``, then
``--no-separable-aspp``) and the U-Net with separable and dense blocks (``--preset
shapes-seg-unet``, then ``--no-separable``), each in its own workdir under ``--root``, and
tabulates their ``summary.json``: parameters, multiply-adds per image, test mIoU, pixel
accuracy, train and eval images/s, minutes of training. A workdir that already holds a
``summary.json`` is not rerun (delete it to measure again); an interrupted run resumes.

    python benchmarks/seg.py --root runs/seg-bench --json benchmarks/results/seg.json
    python benchmarks/seg.py --root /tmp/s --extra="--train-limit 16 --test-limit 8 --image-size 32 --epochs 1"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "deeplabv3plus-separable": ["--preset", "shapes-seg"],
    "deeplabv3plus-regular": ["--preset", "shapes-seg", "--no-separable-aspp"],
    "unet-separable": ["--preset", "shapes-seg-unet"],
    "unet-regular": ["--preset", "shapes-seg-unet", "--no-separable"],
}
FIELDS = ("params", "macs", "test_miou", "pixel_accuracy", "images_per_second", "eval_images_per_second",
          "train_seconds", "loadavg")


def run(name: str, root: Path, extra: list[str]) -> dict:
    work = root / name
    summary = work / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "train", *RUNS[name], *extra, "--workdir", str(work), "--no-progress"]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = json.loads(summary.read_text())
    return {"run": name, "command": shlex.join(["python", "-m", "train", *RUNS[name], *extra]),
            **{k: out.get(k) for k in FIELDS}}


def table(rows: list[dict]) -> str:
    lines = ["| model | convs | params | MACs / image | mIoU | pixel acc. | train img/s | eval img/s | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model, kind = r["run"].rsplit("-", 1)
        lines.append(f"| {model} | {kind} | {r['params']:,} | {r['macs'] / 1e6:,.1f} M | {100 * r['test_miou']:.2f} "
                     f"| {100 * r['pixel_accuracy']:.2f} | {r['images_per_second']:.1f} "
                     f"| {r['eval_images_per_second']:.1f} | {r['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/seg-bench", help="parent of the four workdirs")
    p.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ", ".join(RUNS))
    p.add_argument("--extra", default="", help="extra trainer flags for every run (one string)")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; expected some of {list(RUNS)}")
    rows = [run(n, Path(args.root).absolute(), shlex.split(args.extra)) for n in names]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
