"""Batches on the device mesh: data order, device-resident data set, gathers.

The data order is a pure function of ``(seed, epoch)``: step ``k`` (1-based)
of a run always trains on the same images, whatever was interrupted before,
so resuming needs only the step counter. When the uint8 data set fits (CIFAR-10
is 180 MB), it is put on every device once, replicated, and each step only
sends the (sharded) ``int32`` indices of its batch; the gather runs on the
device. Otherwise the gather is one vectorised NumPy ``take`` on the host.
Arrays are built with ``jax.make_array_from_callback``, which also works when
the mesh spans several hosts (each host fills its own devices' shards).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from train.steps import batch_sharded, replicated


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation of ``range(n)``, pure in (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fits_on_device(nbytes: int) -> bool:
    """Whether ``nbytes`` take at most a quarter of the smallest local device's memory (unknown: yes)."""
    limits = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # not every backend reports memory
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return not limits or nbytes <= min(limits) // 4


class Split:
    """One split (train or test) of the data set, placed for ``mesh``; yields sharded batches."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh, *, on_device: bool):
        self.n = len(labels)
        self.mesh, self.on_device = mesh, on_device
        self._bat = batch_sharded(mesh)
        if on_device:
            rep = replicated(mesh)
            self.images, self.labels = put(images, rep), put(labels, rep)
            out = {"image": self._bat, "label": self._bat}
            self._take = jax.jit(lambda x, y, i: {"image": x[i], "label": y[i]}, out_shardings=out)
        else:
            self.images, self.labels = images, labels

    def batch(self, idx: np.ndarray) -> dict[str, Any]:
        """``{"image": uint8 (B, 32, 32, 3), "label": int32 (B,)}`` for indices ``idx``, batch-sharded."""
        if self.on_device:
            return dict(self._take(self.images, self.labels, put(idx, self._bat)))
        return {"image": put(np.take(self.images, idx, axis=0), self._bat),
                "label": put(np.take(self.labels, idx, axis=0), self._bat)}

    def eval_batches(self, batch_size: int) -> Any:
        """Fixed-size batches covering every example once; the padding has mask 0."""
        for start in range(0, self.n, batch_size):
            idx = np.arange(start, start + batch_size, dtype=np.int32)
            mask = (idx < self.n).astype(np.float32)
            batch = self.batch(np.where(idx < self.n, idx, 0).astype(np.int32))
            batch["mask"] = put(mask, self._bat)
            yield batch


def make_mesh() -> Mesh:
    """A 1-D ``data`` mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))
