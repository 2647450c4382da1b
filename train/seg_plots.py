"""A PNG of test images with ground truth and prediction side by side (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

IGNORE_COLOR = (1.0, 1.0, 1.0)


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` RGB in [0, 1]: black background, then matplotlib's tab10/tab20."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 11 else "tab20"]
    colors = [(0.0, 0.0, 0.0)] + [cmap(i % cmap.N)[:3] for i in range(num_classes - 1)]
    return np.asarray(colors, np.float32)


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` RGB; indices outside ``[0, n)`` (ignore) white."""
    labels = np.asarray(labels)
    colors = np.concatenate([palette(num_classes), np.asarray([IGNORE_COLOR], np.float32)])
    idx = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return colors[idx]


def plot_segmentation(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, path: str | Path,
                      num_classes: int, class_names: Sequence[str] | None = None) -> Path:
    """One row per image: the image, its ground truth and the prediction; written to ``path``.

    ``images`` ``(N, H, W, 3)`` uint8 or float in [0, 1]; ``labels`` / ``preds``
    ``(N, H, W)`` class indices (labels may hold the ignore index, drawn white).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    images, labels, preds = np.asarray(images), np.asarray(labels), np.asarray(preds)
    if not (images.ndim == 4 and labels.shape == preds.shape == images.shape[:3]):
        raise ValueError(f"need images (N, H, W, C) and labels/preds (N, H, W), got {images.shape}, "
                         f"{labels.shape}, {preds.shape}")
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n + 0.6), squeeze=False, constrained_layout=True)
    for i in range(n):
        img = images[i] / 255.0 if images.dtype == np.uint8 else np.clip(images[i], 0, 1)
        for ax, data, title in ((axes[i, 0], img, "image"),
                                (axes[i, 1], colorize(labels[i], num_classes), "ground truth"),
                                (axes[i, 2], colorize(preds[i], num_classes), "prediction")):
            ax.imshow(data, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    handles = [Patch(color=c, label=name) for c, name in zip(palette(num_classes), names, strict=True)]
    handles.append(Patch(facecolor=IGNORE_COLOR, edgecolor="0.5", label="ignore"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
