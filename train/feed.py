"""Batches on the device mesh: data order, device-resident data set, gathers.

The data order is a pure function of ``(seed, epoch)``, defined here with
integer arithmetic only (no NumPy random stream): step ``k`` (1-based) of a
run always trains on the same images, whatever was interrupted before, and
under any NumPy version, so resuming needs only the step counter. When the uint8 data set fits (CIFAR-10
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

ORDER = "splitmix64-argsort-v1"
"""Name of the data-order rule, recorded in every checkpoint: a resume checks it (see :func:`epoch_order`)."""

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on uint64 arrays; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation of ``range(n)``, pure in (seed, epoch).

    Each index ``i`` gets the sort key ``splitmix64(k ^ i)`` with
    ``k = splitmix64(splitmix64(seed) ^ epoch)``; the order is the stable argsort of the keys.
    Only uint64 arithmetic: unlike ``np.random.Generator`` streams (which NumPy may change
    between versions), the order is fixed by this code, so a run resumed under another NumPy
    trains on the same batches. Changing it means a new :data:`ORDER` name.
    """
    word = lambda v: np.array([v & _MASK64], np.uint64)  # noqa: E731 - negative seeds wrap like C
    key = _splitmix64(_splitmix64(word(seed)) ^ word(epoch))
    keys = _splitmix64(key ^ np.arange(n, dtype=np.uint64))
    return np.argsort(keys, kind="stable").astype(np.int32)


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
        self.host_images, self.host_labels = images, labels  # host copies (plots, checks)
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
        """``{"image": uint8 (B, H, W, 3), "label": (B,) or (B, H, W)}`` for indices ``idx``, batch-sharded."""
        if self.on_device:
            return dict(self._take(self.images, self.labels, put(idx, self._bat)))
        return {"image": put(np.take(self.images, idx, axis=0), self._bat),
                "label": put(np.take(self.labels, idx, axis=0), self._bat)}

    def put(self, values: np.ndarray) -> jax.Array:
        """A per-example host array (every process holds all of it), batch-sharded like :meth:`batch`."""
        return put(values, self._bat)

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
