"""On-device augmentation: random crop with zero padding, horizontal flip and cutout.

Runs inside the jitted train step on a whole uint8 batch; randomness comes
from the key the step passes in (``fold_in(seed_key, step)``), so the same
step always sees the same crops and flips, on any number of devices
(``jax_threefry_partitionable`` makes random bits independent of sharding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# x / 255 for every uint8, correctly rounded as in torch's ToTensor(); under jit XLA would turn a
# division by 255 into a multiplication by 1/255, which is 1 ulp off for half of the values.
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def to_float(images: jax.Array) -> jax.Array:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]``, bit-identical to ``ToTensor()`` (the model normalises)."""
    return jnp.asarray(_UINT8_TO_UNIT)[images.astype(jnp.int32)]


def random_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
    """Crop each ``(H, W)`` image at a random offset from its zero-padded ``(H+2p, W+2p)`` version."""
    if padding == 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(img: jax.Array, off: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def random_cutout(images: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """Zero a ``size x size`` square of each image at a uniformly random centre, clipped at the
    border (DeVries & Taylor 2017: a centre near the edge leaves less of the square inside)."""
    if size == 0:
        return images
    n, h, w, _ = images.shape
    corner = jax.random.randint(key, (n, 2), 0, jnp.array([h, w])) - size // 2

    def inside(extent: int, start: jax.Array) -> jax.Array:
        pos = jnp.arange(extent)
        return (pos >= start[:, None]) & (pos < start[:, None] + size)

    mask = inside(h, corner[:, 0])[:, :, None, None] & inside(w, corner[:, 1])[:, None, :, None]
    return jnp.where(mask, jnp.zeros((), images.dtype), images)


def augment(images: jax.Array, key: jax.Array, *, padding: int = 4, flip: bool = True,
            cutout: int = 0) -> jax.Array:
    """Crop + flip (+ cutout) a uint8 batch ``(N, H, W, C)``; returns float32 in ``[0, 1]``."""
    k_crop, k_flip = jax.random.split(key)
    images = random_crop(images, k_crop, padding)
    if flip:
        images = random_flip(images, k_flip)
    # A key of its own, folded in, so that turning cutout on leaves the crops and flips as they were.
    images = random_cutout(images, jax.random.fold_in(key, 2), cutout)
    return to_float(images)
