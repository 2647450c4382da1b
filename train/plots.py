"""Training curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy (train and test) per evaluated epoch, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for split, style in (("train", "-o"), ("test", "-s")):
            pts = [(e, r[f"{split}_{key}"]) for e, r in zip(epochs, records, strict=True)
                   if r.get(f"{split}_{key}") is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(0, 1)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
