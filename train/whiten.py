"""Patch-whitening initialisation of the DSCNet stem (``--stem-init whiten``), after airbench.

The stem's first ``2 n`` filters start as the top ``n`` eigenvectors of the
covariance of the training images' ``k x k`` patches (normalised as the model
normalises them), each scaled by ``1 / sqrt(eigenvalue + eps)``, and their
negatives: the conv's outputs start decorrelated with unit variance, and the
ReLU after the BatchNorm keeps both signs of every component. The remaining
filters keep their random initialisation. Computed in NumPy from the first
``max_images`` training images (deterministic for a data set), so the JAX
trainer and the PyTorch reference start from the same stem.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdsc.models import DSCNet

EPS = 5e-4  # airbench's: keeps the smallest patch components (near-constant patches) from blowing up
MAX_IMAGES = 5000  # the covariance of 27 dims is settled well before this (4.5M patches)


def patch_whitening(images: np.ndarray, mean: Sequence[float], std: Sequence[float], kernel_size: int,
                    pairs: int, *, eps: float = EPS, max_images: int = MAX_IMAGES) -> np.ndarray:
    """``(k, k, C, 2 * pairs)`` float32 HWIO kernel: the top ``pairs`` whitening filters, then their negatives.

    ``images``: uint8 ``(N, H, W, C)``; ``mean``/``std``: the model's input normalisation of
    ``images / 255``. ``pairs`` is at most ``k * k * C``.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    k, c = kernel_size, images.shape[-1]
    if not 1 <= pairs <= k * k * c:
        raise ValueError(f"pairs must be in [1, {k * k * c}] for {k}x{k} patches of {c} channels, got {pairs}")
    mean_a, std_a = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    cov, count = np.zeros((k * k * c,) * 2), 0
    for i in range(0, min(len(images), max_images), 500):
        x = (images[i:min(i + 500, max_images)] / 255.0 - mean_a) / std_a
        # (n, H-k+1, W-k+1, C, k, k) -> rows of (kh, kw, C), the order of an HWIO kernel's first three axes
        patches = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
        rows = patches.reshape(-1, k * k * c)
        cov += rows.T @ rows
        count += len(rows)
    values, vectors = np.linalg.eigh(cov / count)  # ascending
    values, vectors = values[::-1][:pairs], vectors[:, ::-1][:, :pairs]
    filters = (vectors / np.sqrt(values + eps)).reshape(k, k, c, pairs)
    return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


def stem_filters(images: np.ndarray, mean: Sequence[float], std: Sequence[float], kernel_size: int,
                 out_features: int) -> np.ndarray:
    """The whitening filters for a stem of ``out_features`` channels: as many pairs as fit
    (``min(out_features // 2, k * k * C)``), shape ``(k, k, C, 2 * pairs)``."""
    pairs = min(out_features // 2, kernel_size * kernel_size * images.shape[-1])
    return patch_whitening(images, mean, std, kernel_size, pairs)


def whiten_stem(model: DSCNet, images: np.ndarray) -> int:
    """Set the first filters of ``model.stem`` (a :class:`jaxdsc.models.DSCNet`) to :func:`stem_filters`
    in place; returns how many were set."""
    kernel = model.stem.conv.kernel
    mean, std = np.asarray(model.normalize.mean.get_value()), np.asarray(model.normalize.std.get_value())
    filters = stem_filters(images, mean, std, kernel.shape[0], kernel.shape[-1])
    value = kernel.get_value()
    kernel.set_value(value.at[..., :filters.shape[-1]].set(jnp.asarray(filters, value.dtype)))
    return filters.shape[-1]
