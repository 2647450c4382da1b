"""Semantic-segmentation metrics exactly as torchvision's reference scripts compute them.

torchvision ``references/segmentation/utils.py`` ``ConfusionMatrix``: one
``(n, n)`` int64 matrix over the whole test set, rows the true class, columns
the predicted one; pixels whose target is outside ``[0, n)`` (the ignore label
255) are skipped. ``compute()`` works in float32::

    acc_global = diag(h).sum() / h.sum()                   # pixel accuracy
    acc        = diag(h) / h.sum(1)                        # per-class recall
    iu         = diag(h) / (h.sum(1) + h.sum(0) - diag(h)) # per-class IoU
    mean IoU   = iu.mean()

A class absent from both targets and predictions has IoU 0/0 = NaN, and the
mean IoU is then NaN, as in torchvision (the test split of shapes-seg holds
every class). Batches can be counted inside ``jit`` with
:func:`confusion_matrix_jax` and summed on the host in int64.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _check(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds must have the same shape, got {labels.shape} and {preds.shape}")
    for name, a in (("labels", labels), ("preds", preds)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be integer class indices, got dtype {a.dtype}")
    if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
        raise ValueError(f"preds must lie in [0, {num_classes}), got values in "
                         f"[{preds.min()}, {preds.max()}]")


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
    """``(n, n)`` int64 counts ``[true, predicted]``; targets outside ``[0, n)`` are ignored."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    _check(labels, preds, num_classes)
    n = int(num_classes)
    keep = (labels >= 0) & (labels < n)
    inds = n * labels[keep].astype(np.int64) + preds[keep]
    return np.bincount(inds, minlength=n * n).reshape(n, n).astype(np.int64)


def confusion_matrix_jax(labels: Any, preds: Any, num_classes: int) -> Any:
    """The same counts as a jit-able JAX function (int32: sum batches on the host in int64)."""
    import jax.numpy as jnp

    n = int(num_classes)
    labels = labels.astype(jnp.int32).ravel()
    keep = (labels >= 0) & (labels < n)
    inds = jnp.where(keep, n * labels + preds.astype(jnp.int32).ravel(), 0)
    return jnp.bincount(inds, weights=keep.astype(jnp.int32), length=n * n).reshape(n, n)


def compute(mat: Any) -> tuple[np.float32, np.ndarray, np.ndarray]:
    """(pixel accuracy, per-class accuracy, per-class IoU) in float32, as torchvision."""
    h = np.asarray(mat).astype(np.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"mat must be a square (n, n) matrix, got shape {h.shape}")
    d = np.diag(h)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_global = d.sum() / h.sum()
        acc = d / h.sum(1)
        iu = d / (h.sum(1) + h.sum(0) - d)
    return acc_global, acc, iu


def metrics(mat: Any) -> dict[str, Any]:
    """JSON-ready: ``pixel_accuracy``, ``mean_iou`` (0..1), per-class ``iou`` and ``accuracy``."""
    acc_global, acc, iu = compute(mat)
    return {"pixel_accuracy": float(acc_global), "mean_iou": float(iu.mean()),
            "iou": [float(v) for v in iu], "accuracy": [float(v) for v in acc]}


class ConfusionMatrix:
    """Accumulates over batches (``update(labels, preds)``), like torchvision's class."""

    def __init__(self, num_classes: int):
        _check(np.zeros(0, np.int64), np.zeros(0, np.int64), num_classes)
        self.num_classes = int(num_classes)
        self.mat = np.zeros((self.num_classes,) * 2, np.int64)

    def update(self, labels: Any, preds: Any) -> None:
        self.mat += confusion_matrix(labels, preds, self.num_classes)

    def add(self, counts: Any) -> None:
        """Add an ``(n, n)`` count matrix, e.g. from :func:`confusion_matrix_jax`."""
        counts = np.asarray(counts)
        if counts.shape != self.mat.shape or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"counts must be an integer {self.mat.shape} matrix, got {counts.dtype} {counts.shape}")
        self.mat += counts.astype(np.int64)

    def reset(self) -> None:
        self.mat[...] = 0

    def compute(self) -> tuple[np.float32, np.ndarray, np.ndarray]:
        return compute(self.mat)

    def __str__(self) -> str:
        acc_global, acc, iu = self.compute()
        return (f"global correct: {acc_global * 100:.1f}\n"
                f"average row correct: {[f'{v:.1f}' for v in (acc * 100).tolist()]}\n"
                f"IoU: {[f'{v:.1f}' for v in (iu * 100).tolist()]}\n"
                f"mean IoU: {iu.mean() * 100:.1f}")
