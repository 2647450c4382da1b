"""Test-time augmentation for image classification: logits averaged over mirrored and shifted views.

``flip`` averages the logits of each image and its left-right mirror (the
training augmentation flips, so both are in-distribution); ``flip-shift``
adds the views shifted by one pixel diagonally each way, with reflect
padding, weighted as airbench's ``infer_mirror_translate``: half for the
unshifted pair, a quarter for each shifted pair (6 forward passes).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

TTA_MODES = ("none", "flip", "flip-shift")


def mirror(images: jax.Array) -> jax.Array:
    """Left-right mirror of ``(N, H, W, C)`` images."""
    return images[:, :, ::-1, :]


def shifted(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The images moved one pixel up-left and one down-right (reflect padding keeps the statistics)."""
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return padded[:, :h, :w], padded[:, 2:, 2:]


def tta_logits(apply: Callable[[jax.Array], jax.Array], images: jax.Array, mode: str
               ) -> tuple[jax.Array, jax.Array]:
    """``(averaged logits, plain logits)`` of ``apply`` on float images ``(N, H, W, C)``."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta mode must be one of {TTA_MODES}, got {mode!r}")
    plain = apply(images)
    if mode == "none":
        return plain, plain
    logits = 0.5 * (plain + apply(mirror(images)))
    if mode == "flip":
        return logits, plain
    pair = lambda x: 0.5 * (apply(x) + apply(mirror(x)))  # noqa: E731
    up_left, down_right = shifted(images)
    return 0.5 * logits + 0.25 * (pair(up_left) + pair(down_right)), plain
