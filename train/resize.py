"""Progressive resizing: train at smaller images early, at full size late (``--train-sizes``).

The train step downscales its augmented batch (after crop and flip) to the
phase's size; a fully convolutional classifier with global pooling takes any
size, and a smaller image costs about the square of the ratio per step. The
last phase is usually the data's own size, so the network ends on the
statistics it is tested on. A phase is a share of the steps, not of the
epochs, so resuming from any step lands in the same phase.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax


def size_at(sizes: Sequence[int], step: int, total_steps: int) -> int:
    """The image size of step ``step`` (0-based) of ``total_steps``: ``sizes`` in equal shares.

    A size repeated takes that many shares: ``(24, 24, 32)`` trains the first
    two thirds of the steps at 24x24. Step ``k`` is in phase
    ``k * len(sizes) // total_steps``.
    """
    if not sizes:
        raise ValueError("sizes must not be empty")
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, total_steps), got step={step}, total_steps={total_steps}")
    return int(sizes[step * len(sizes) // total_steps])


def resize(images: jax.Array, size: int) -> jax.Array:
    """Float images ``(N, H, W, C)`` -> ``(N, size, size, C)``: bilinear, antialiased when downscaling.

    The same function as PyTorch's ``F.interpolate(x, size, mode="bilinear",
    antialias=True, align_corners=False)`` (NCHW), which the PyTorch reference
    trainer uses. A no-op at the images' own size.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (n, size, size, c), "linear", antialias=True).astype(images.dtype)

