"""Small CIFAR-10 look-alikes in the official on-disk formats, for tests and smoke runs.

The images are learnable (each class has its own colour and a stripe
pattern, plus noise), so a few training steps visibly lower the loss.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from train.data import BIN_DIR, PY_DIR, TEST_FILE, TRAIN_FILES


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 NHWC 32x32 RGB images and their labels (0..9, balanced)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    colours = np.random.default_rng(1234).uniform(40, 215, size=(10, 3))
    rows = np.arange(32)[:, None]
    images = np.empty((n, 32, 32, 3), np.float32)
    for c in range(10):
        idx = labels == c
        stripes = 40.0 * np.sin(rows * (c + 1) * np.pi / 16)[None, :, :, None]  # class-specific frequency
        images[idx] = colours[c] + stripes + rng.normal(0, 30, size=(int(idx.sum()), 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _records(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    return np.concatenate([labels[:, None], planes], axis=1)


def write_cifar10(dest: str | Path, n_train: int = 500, n_test: int = 100, *, layout: str = "bin",
                  seed: int = 0) -> Path:
    """Write ``dest/cifar-10-batches-bin/`` (``layout="bin"``) or ``-py/`` (``"py"``); returns ``dest``.

    The training images are split over the five ``data_batch_*`` files as in the official release.
    """
    dest = Path(dest)
    x, y = synthetic(n_train + n_test, seed)
    splits = dict(zip(TRAIN_FILES, np.array_split(np.arange(n_train), 5), strict=True))
    splits[TEST_FILE] = np.arange(n_train, n_train + n_test)
    out = dest / (BIN_DIR if layout == "bin" else PY_DIR)
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in splits.items():
        if layout == "bin":
            _records(x[idx], y[idx]).tofile(out / f"{name}.bin")
        else:
            planes = x[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
            with open(out / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"labels": y[idx].tolist(), b"data": planes,
                             b"filenames": [f"{i}.png".encode() for i in idx]}, f, protocol=2)
    return dest


def write_archive(dest: str | Path, n_train: int = 500, n_test: int = 100, *, layout: str = "bin",
                  seed: int = 0) -> Path:
    """The official ``cifar-10-binary.tar.gz`` / ``cifar-10-python.tar.gz`` layout, as one file."""
    dest = Path(dest)
    tmp = dest / ".archive-src"
    write_cifar10(tmp, n_train, n_test, layout=layout, seed=seed)
    sub = BIN_DIR if layout == "bin" else PY_DIR
    path = dest / ("cifar-10-binary.tar.gz" if layout == "bin" else "cifar-10-python.tar.gz")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp / sub, arcname=sub)
    path.write_bytes(buf.getvalue())
    return path
