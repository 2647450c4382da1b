"""Per-shard forms of the native FFI calls under a batch-sharded ``jit``.

XLA cannot look inside a custom call, so without a rule it replicates the
operands of a ``jaxdsc_*`` call and every device computes the whole batch.
:func:`batch_op` wraps a kernel in ``jax.experimental.custom_partitioning``:
when the SPMD partitioner finds the batch axis (axis 0 of the operands
marked ``batched``) split over mesh axes, each device runs the kernel on its
own shard; per-example outputs stay split, and outputs that sum over the
batch (weight gradients) are the per-shard partials all-reduced with
``psum``. Ops whose per-shard form needs more than a final ``psum`` (batch
norm statistics) pass their own ``per_shard``. A batch that does not divide
evenly over the devices, or an unsharded call, runs the kernel whole; on one
device the wrapper lowers to the plain kernel.

The wrapper is also ``custom_vmap``-ped (``custom_partitioning`` has no
batching rule): a vmapped call loops over the mapped axis, as the FFI calls'
``vmap_method="sequential"`` did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

BATCH = "batch"  # output whose axis 0 is the batch (per example)
SUM = "sum"  # output that sums over the batch (per-shard partial + psum)

PerShard = Callable[..., Any]  # (axes, *arrays) -> outputs


def _factor_names() -> list[str]:
    letters = "abcdefghijklmopqrstuvwxyz"  # "n" is the batch factor
    return [a + b for a in letters for b in letters]


def _rule(ranks: Sequence[int], batched: Sequence[bool], out_ranks: Sequence[int],
          outputs: Sequence[str]) -> str:
    """Shardy rule: the batch factor ``n`` on axis 0 of batched operands and BATCH outputs."""
    names = iter(_factor_names())

    def spec(rank: int, has_batch: bool) -> str:
        dims = ["n"] if has_batch else []
        dims += [next(names) for _ in range(rank - len(dims))]
        return " ".join(dims)

    ins = ", ".join(spec(r, b) for r, b in zip(ranks, batched, strict=True))
    outs = ", ".join(spec(r, o == BATCH) for r, o in zip(out_ranks, outputs, strict=True))
    return f"{ins} -> {outs}"


def _batch_axes(mesh: Any, arg_shapes: Sequence[Any], batched: Sequence[bool]) -> Any:
    """The mesh axes (a PartitionSpec entry) axis 0 of the batched operands is split over, or None."""
    first = next(s for s, b in zip(arg_shapes, batched, strict=True) if b)
    sharding = first.sharding
    if not isinstance(sharding, NamedSharding) or not len(sharding.spec):
        return None
    entry = sharding.spec[0]
    if entry is None:
        return None
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    shards = math.prod(mesh.shape[a] for a in names)
    if shards <= 1 or any(s.shape[0] % shards for s, b in zip(arg_shapes, batched, strict=True) if b):
        return None  # uneven shards would feed padding rows to the reductions
    return entry


def _psum_sums(fn: Callable[..., Any], outputs: Sequence[str]) -> PerShard:
    def per_shard(axes: Any, *arrays: Any) -> Any:
        out = fn(*arrays)
        if len(outputs) == 1:
            return lax.psum(out, axes) if outputs[0] == SUM else out
        return tuple(lax.psum(o, axes) if k == SUM else o for o, k in zip(out, outputs, strict=True))

    return per_shard


def batch_op(fn: Callable[..., Any], *, batched: Sequence[bool], outputs: Sequence[str],
             per_shard: PerShard | None = None) -> Callable[..., Any]:
    """``fn(*arrays)`` (one array, or a tuple for several ``outputs``) with a per-shard form.

    Args:
      fn: the kernel call; all geometry static (closed over).
      batched: per operand, whether its axis 0 is the batch (N, or the N * spatial rows).
      outputs: per output, :data:`BATCH` or :data:`SUM`.
      per_shard: ``per_shard(axes, *shards)``, the program on one shard when the
        batch is split over mesh axes ``axes``; default ``fn`` with the
        :data:`SUM` outputs ``psum``-ed over ``axes``.
    """
    batched, outputs = tuple(batched), tuple(outputs)
    shard_fn = per_shard or _psum_sums(fn, outputs)
    cache: dict[tuple[int, ...], Callable[..., Any]] = {}

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        axes = _batch_axes(mesh, arg_shapes, batched)
        split = PartitionSpec(axes)
        arg_sh = tuple(NamedSharding(mesh, split if b else PartitionSpec()) for b in batched)
        res_sh = [NamedSharding(mesh, split if k == BATCH else PartitionSpec()) for k in outputs]
        lower = fn if axes is None else (lambda *a: shard_fn(axes, *a))
        return mesh, lower, (res_sh[0] if len(outputs) == 1 else tuple(res_sh)), arg_sh

    def partitioned(arrays: Sequence[Any]) -> Callable[..., Any]:
        """One custom_partitioning op per operand ranks (the Shardy rule names every axis)."""
        ranks = tuple(a.ndim for a in arrays)
        if ranks not in cache:
            out_ranks = [o.ndim for o in jax.tree.leaves(jax.eval_shape(fn, *arrays))]
            op = custom_partitioning(fn)
            op.def_partition(
                partition=partition,
                sharding_rule=_rule(ranks, batched, out_ranks, outputs),
                reduction_factors=("n",) if BATCH not in outputs else (),
            )
            cache[ranks] = op
        return cache[ranks]

    @jax.custom_batching.custom_vmap
    def call(*arrays: Any) -> Any:
        return partitioned(arrays)(*arrays)

    @call.def_vmap
    def _vmap(axis_size: int, in_batched: Sequence[bool], *arrays: Any) -> tuple[Any, Any]:
        del axis_size
        mapped = [i for i, b in enumerate(in_batched) if b]

        def one(slices: Sequence[Any]) -> Any:
            args = list(arrays)
            for i, s in zip(mapped, slices, strict=True):
                args[i] = s
            return call(*args)

        out = lax.map(one, [arrays[i] for i in mapped])
        return out, jax.tree.map(lambda _: True, out)

    return call
