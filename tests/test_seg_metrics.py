"""train.seg_metrics against hand-made confusion matrices and a transcription of torchvision's
reference ConfusionMatrix (references/segmentation/utils.py); train.seg_plots writes a valid PNG."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from train import seg_metrics as sm
from train.seg_plots import plot_segmentation


def torchvision_reference(a: np.ndarray, b: np.ndarray, n: int):
    """torchvision's ConfusionMatrix.update + compute, transcribed."""
    a, b = torch.from_numpy(a.ravel()), torch.from_numpy(b.ravel())
    mat = torch.zeros((n, n), dtype=torch.int64)
    k = (a >= 0) & (a < n)
    inds = n * a[k].to(torch.int64) + b[k]
    mat += torch.bincount(inds, minlength=n**2).reshape(n, n)
    h = mat.float()
    return mat.numpy(), (torch.diag(h).sum() / h.sum()).numpy(), (torch.diag(h) / h.sum(1)).numpy(), \
        (torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))).numpy()


def test_hand_made():
    labels = np.array([[0, 0, 1], [1, 2, 255]])
    preds = np.array([[0, 1, 1], [1, 2, 0]])
    mat = sm.confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(mat, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])  # the 255 pixel skipped
    acc_global, acc, iu = sm.compute(mat)
    assert acc_global == np.float32(4) / np.float32(5)
    np.testing.assert_array_equal(acc, np.float32([0.5, 1, 1]))
    np.testing.assert_array_equal(iu, np.float32([1 / 2, 2 / 3, 1]))
    m = sm.metrics(mat)
    assert m["mean_iou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3, abs=1e-7)  # float32 mean
    assert m["pixel_accuracy"] == pytest.approx(0.8, abs=1e-7)

    # All wrong, perfect, and a class nowhere (IoU 0/0 = NaN, mean NaN, as torchvision).
    assert sm.metrics([[0, 5], [7, 0]])["mean_iou"] == 0.0
    assert sm.metrics(np.diag([3, 4, 5]))["mean_iou"] == 1.0
    nan = sm.metrics([[2, 0, 0], [1, 3, 0], [0, 0, 0]])
    assert np.isnan(nan["iou"][2]) and np.isnan(nan["mean_iou"]) and nan["iou"][1] == 0.75


def test_matches_torchvision_and_jax():
    rng = np.random.default_rng(0)
    n = 5
    labels = rng.integers(0, n, (4, 31, 29)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.1] = 255
    preds = np.where(rng.random(labels.shape) < 0.6, labels % n, rng.integers(0, n, labels.shape))
    mat_ref, acc_g, acc, iu = torchvision_reference(labels.astype(np.int64), preds, n)
    cm = sm.ConfusionMatrix(n)
    for i in range(len(labels)):  # batch by batch, as an evaluation loop does
        cm.update(labels[i], preds[i])
    np.testing.assert_array_equal(cm.mat, mat_ref)
    got = cm.compute()
    # float32 like torchvision; sums of <= 5 exact integers < 2**24: same bits.
    for a, b in zip(got, (acc_g, acc, iu), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "mean IoU" in str(cm)
    counts = jax.jit(sm.confusion_matrix_jax, static_argnums=2)(jnp.asarray(labels), jnp.asarray(preds), n)
    np.testing.assert_array_equal(np.asarray(counts), mat_ref)
    cm.reset()
    cm.add(np.asarray(counts))
    np.testing.assert_array_equal(cm.mat, mat_ref)


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        sm.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(ValueError, match=r"preds must lie in \[0, 3\)"):
        sm.confusion_matrix(np.zeros(2, int), np.array([0, 3]), 3)
    with pytest.raises(TypeError, match="preds must be integer"):
        sm.confusion_matrix(np.zeros(2, int), np.zeros(2), 3)
    with pytest.raises(ValueError, match="num_classes"):
        sm.ConfusionMatrix(0)
    with pytest.raises(ValueError, match="square"):
        sm.compute(np.zeros((2, 3)))


def test_png(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (2, 20, 24))
    labels[0, :3] = 255
    preds = rng.integers(0, 4, (2, 20, 24))
    path = plot_segmentation(images, labels, preds, tmp_path / "seg.png", 4, ["bg", "a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = matplotlib.image.imread(path)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 200
    with pytest.raises(ValueError, match="labels/preds"):
        plot_segmentation(images, labels[:1], preds, tmp_path / "bad.png", 4)
