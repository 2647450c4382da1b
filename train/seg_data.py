"""shapes-seg: a seeded, generated semantic-segmentation data set (NumPy, vectorised).

Each image (default 128x128 RGB, uint8) shows 2-6 overlapping shapes of four
classes on a textured background, with pixel noise; later shapes occlude
earlier ones. Colours and textures are drawn independently of the class, so a
model must recognise the *shape* (a ring and a disk of the same colour differ
only by their hole; context matters, which is what dilation is for).

Labels (uint8, ``(N, H, W)``): :data:`CLASSES` indices, 0 the background, and
:data:`IGNORE_INDEX` (255) on a band around every label boundary (pixels whose
3x3 neighbourhood holds another label), as VOC's "void" borders: those pixels
count neither in the loss nor in the metrics.

Determinism: image ``i`` of a split is drawn from its own stream,
``SeedSequence((TRAIN_TAG, seed, i))`` for train and ``SeedSequence((TEST_TAG,
i))`` for test, so the test split is fixed (independent of ``seed``), never
shares a stream with any train split, and the first ``n`` images do not depend
on how many are generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("background", "disk", "rectangle", "triangle", "ring")
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255
SIZE = 128
MAX_SHAPES = 6
TRAIN_TAG, TEST_TAG = 0x73736567, 0x74657374  # distinct entropy prefixes: disjoint streams
_CHUNK = 16  # images rendered at once (bounds the (chunk, shapes, H, W) temporaries)


@dataclass(frozen=True)
class ShapesSeg:
    """Images ``(N, H, W, 3)`` uint8 and labels ``(N, H, W)`` uint8 of both splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int = NUM_CLASSES
    ignore_index: int = IGNORE_INDEX
    class_names: tuple[str, ...] = CLASSES


def _params(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """The random description of one image (a few dozen numbers)."""
    k = MAX_SHAPES
    return {
        "present": np.arange(k) < rng.integers(2, k + 1),
        "cls": rng.integers(1, NUM_CLASSES, k),
        "center": rng.uniform(0.1, 0.9, (k, 2)) * size,
        "radius": rng.uniform(0.1, 0.25, k) * size,
        "aspect": rng.uniform(0.4, 1.0, k),
        "angle": rng.uniform(0, 2 * np.pi, k),
        "color": rng.uniform(0, 1, (k, 3)),
        "tex": rng.uniform(0.05, 0.25, (k + 1, 4)),  # per shape + background: amp, freq x/y, phase
        "bg": rng.uniform(0, 1, (2, 3)),  # background colours at two opposite corners
        "noise": rng.normal(0, 0.05, (size, size, 3)),
    }


def _stack(ps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([p[key] for p in ps]) for key in ps[0]}


def _texture(tex: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Stripes over the grid for ``(B, 4)`` parameters (amplitude, frequency x / y, phase)."""
    amp, fx, fy, ph = (tex[:, i, None, None] for i in range(4))
    return amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + 20 * ph)


def _render(p: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (float32 in [0, 1]) and labels of B images: shapes painted in order, later on top."""
    p = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in p.items()}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    w = ((xx + yy) / (2 * size))[None, :, :, None]
    image = p["bg"][:, None, None, 0] * (1 - w) + p["bg"][:, None, None, 1] * w
    image += _texture(p["tex"][:, -1], xx, yy)[..., None]
    labels = np.zeros(image.shape[:3], np.uint8)
    for k in range(MAX_SHAPES):  # (B, H, W) at a time: small temporaries, cache-friendly
        def col(a: np.ndarray, k: int = k) -> np.ndarray:
            return a[:, k, None, None]

        dx, dy = xx - col(p["center"][..., 0]), yy - col(p["center"][..., 1])
        cos, sin = np.cos(col(p["angle"])), np.sin(col(p["angle"]))
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        r, cls = col(p["radius"]), col(p["cls"])
        rr = u * u + v * v
        disk = rr <= r * r
        rect = (np.abs(u) <= r) & (np.abs(v) <= r * col(p["aspect"]))
        # Equilateral: three half-planes at the inradius 0.7 r (an area close to the others').
        tri = u <= 0.7 * r
        for a in (2 * np.pi / 3, 4 * np.pi / 3):
            tri &= u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) <= 0.7 * r
        ring = disk & (rr >= (0.55 * r) ** 2)
        inside = np.select([cls == 1, cls == 2, cls == 3], [disk, rect, tri], ring)
        inside &= col(p["present"])
        fill = p["color"][:, k, None, None, :] + _texture(p["tex"][:, k], xx, yy)[..., None]
        image = np.where(inside[..., None], fill, image)
        labels = np.where(inside, cls.astype(np.uint8), labels)
    return np.clip(image + p["noise"], 0, 1), labels


def _ignore_borders(labels: np.ndarray) -> np.ndarray:
    """Set pixels with a different label in their 3x3 neighbourhood to IGNORE_INDEX."""
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = labels.shape[1:]
    border = np.zeros(labels.shape, bool)
    for dy in range(3):
        for dx in range(3):
            border |= padded[:, dy:dy + h, dx:dx + w] != labels
    return np.where(border, IGNORE_INDEX, labels).astype(np.uint8)


def generate(n: int, *, split: str = "train", seed: int = 0, size: int = SIZE,
             start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+n-1`` of ``split`` ("train" or "test"): uint8 images and labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for name, value, low in (("n", n, 0), ("size", size, 16), ("start", start, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    for lo in range(0, n, _CHUNK):
        idx = range(start + lo, start + min(n, lo + _CHUNK))
        entropy = [(TRAIN_TAG, seed, i) if split == "train" else (TEST_TAG, i) for i in idx]
        params = _stack([_params(np.random.default_rng(np.random.SeedSequence(e)), size) for e in entropy])
        img, lab = _render(params, size)
        images[lo:lo + len(idx)] = np.round(img * 255).astype(np.uint8)
        labels[lo:lo + len(idx)] = _ignore_borders(lab)
    return images, labels


def load(train: int = 2000, test: int = 500, *, seed: int = 0, size: int = SIZE) -> ShapesSeg:
    """Both splits: ``train`` images from ``seed``'s stream, the fixed first ``test`` test images."""
    tr = generate(train, split="train", seed=seed, size=size)
    te = generate(test, split="test", size=size)
    return ShapesSeg(*tr, *te)
