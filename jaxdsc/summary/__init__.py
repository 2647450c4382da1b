"""Per-layer parameters and multiply-adds of any Flax NNX model built from jaxdsc layers.

``summary(model, input_shape)`` runs the model abstractly (``jax.eval_shape``:
no FLOPs spent, no arrays allocated) on a copy of it, intercepting the
``__call__`` of every module in its tree to record each call's path and output
shape, then applies exact per-layer formulas (:mod:`jaxdsc.summary._counts`,
whose docstring states the counting conventions). Each separable layer also
shows what its regular counterpart would cost: ``SeparableConv`` -> ``Conv``,
``SeparableBlock`` -> ``ConvBlock``, and a ``DepthwiseConv`` followed (BatchNorms
and activations aside) by a ``PointwiseConv`` on its output -> one ``Conv``.

Command line: ``python -m jaxdsc.summary NAME --input 1,224,224,3`` for any
:func:`jaxdsc.models.create` name.

The interception patches module classes for the duration of the abstract
trace; do not run two summaries at once from different threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc.conv import DepthwiseConv, PointwiseConv
from jaxdsc.norm import BatchNorm
from jaxdsc.summary._counts import (
    LEAF_TYPES,
    SEPARABLE_TYPES,
    leaf_macs,
    param_count,
    regular_conv_cost,
    regular_equivalent,
)

__all__ = ["Row", "Summary", "summary"]

_LAYERS = LEAF_TYPES + SEPARABLE_TYPES  # a root of these types is a row itself

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One module call.

    ``leaf`` rows are layers counted by formula; the others are containers whose
    ``macs`` sum their leaves (``None`` when the container holds parameters of
    its own that no formula covers). ``regular_params`` / ``regular_macs``: the
    regular conv that would replace this separable layer (or, on a
    ``PointwiseConv`` row, the depthwise+pointwise pair that ends here), whose
    own cost is ``separable_params`` / ``separable_macs``; ``None`` elsewhere.
    A module called twice has two rows; its parameters count on the first.
    """

    path: str
    type: str
    output_shape: Shape | tuple[Shape, ...]
    params: int
    macs: int | None
    depth: int
    leaf: bool
    regular_params: int | None = None
    regular_macs: int | None = None
    separable_params: int | None = None
    separable_macs: int | None = None


@dataclass(frozen=True)
class Summary:
    """The result of :func:`summary`; ``str()`` is the table."""

    input_shape: Shape
    rows: tuple[Row, ...]
    total_params: int
    total_macs: int
    uncounted: tuple[str, ...] = field(default=())

    @property
    def regular_macs(self) -> int:
        """``total_macs`` with every separable layer replaced by its regular conv."""
        return self.total_macs + sum(r.regular_macs - r.separable_macs for r in self._compared())

    @property
    def regular_params(self) -> int:
        """``total_params`` with every separable layer replaced by its regular conv."""
        return self.total_params + sum(r.regular_params - r.separable_params for r in self._compared())

    def _compared(self) -> list[Row]:
        return [r for r in self.rows if r.regular_macs is not None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals, the regular-conv totals and every row."""
        return {
            "input_shape": list(self.input_shape), "total_params": self.total_params,
            "total_macs": self.total_macs, "regular_params": self.regular_params,
            "regular_macs": self.regular_macs, "uncounted": list(self.uncounted),
            "rows": [asdict(r) for r in self.rows],
        }

    def table(self, max_depth: int | None = None) -> str:
        """The table; ``max_depth=0`` shows only the outermost rows (totals are always complete)."""
        from jaxdsc.summary._table import format_table

        return format_table(self, max_depth)

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Call:
    path: tuple[Any, ...]
    module: nnx.Module
    depth: int
    leaf: bool
    out: Any = None


def _defining_class(cls: type) -> type | None:
    for klass in cls.__mro__:
        if "__call__" in vars(klass) and klass.__module__ != "builtins":
            return klass
    return None


@contextlib.contextmanager
def _intercept(root: nnx.Module, calls: list[_Call]) -> Iterator[None]:
    """Record every call of a module of ``root``'s tree (not inside a leaf layer)."""
    paths: dict[int, tuple[Any, ...]] = {}
    for path, sub in nnx.iter_modules(root):
        paths.setdefault(id(sub), tuple(path))
    owners = {k for _, sub in nnx.iter_modules(root) if (k := _defining_class(type(sub)))}
    stack: list[_Call] = []

    def wrap(original):
        @functools.wraps(original)
        def call(self, *args, **kwargs):
            path = paths.get(id(self))
            # Skip a root that is a model rather than a layer, modules outside the
            # tree, a super().__call__ of the module being recorded, and
            # everything a leaf layer calls.
            if (path is None or (path == () and not isinstance(self, _LAYERS))
                    or (stack and (stack[-1].module is self or stack[-1].leaf))):
                return original(self, *args, **kwargs)
            rec = _Call(path, self, len(stack), isinstance(self, LEAF_TYPES))
            calls.append(rec)
            stack.append(rec)
            try:
                rec.out = original(self, *args, **kwargs)
            finally:
                stack.pop()
            return rec.out

        return call

    originals = {k: vars(k)["__call__"] for k in owners}
    try:
        for k, original in originals.items():
            k.__call__ = wrap(original)  # type: ignore[method-assign]
        yield
    finally:
        for k, original in originals.items():
            k.__call__ = original  # type: ignore[method-assign]


def _shapes(out: Any) -> Shape | tuple[Shape, ...]:
    shapes = tuple(tuple(int(d) for d in a.shape) for a in jax.tree.leaves(out) if hasattr(a, "shape"))
    return shapes[0] if len(shapes) == 1 else shapes


def _own_params(module: nnx.Module) -> int:
    """Params of ``module`` that are not inside one of its submodules."""
    subs = {tuple(p) for p, _ in nnx.iter_modules(module) if p}
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return sum(math.prod(v.get_value().shape) for p, v in flat
               if not any(tuple(p[:i]) in subs for i in range(1, len(p))))


def _trace(model: nnx.Module, x: jax.ShapeDtypeStruct, train: bool) -> list[_Call]:
    graphdef, state = nnx.split(model)
    calls: list[_Call] = []

    def run(state, x):
        m = nnx.merge(graphdef, state)  # a copy: the model's own state is never touched
        if not train:
            m.eval()
        calls.clear()
        with _intercept(m, calls):
            return m(x)

    jax.eval_shape(run, state, x)
    return calls


def _pair_rows(rows: list[Row], calls: list[_Call]) -> None:
    """Annotate each PointwiseConv that ends a depthwise+pointwise pair outside a separable layer."""
    compared = [r.path for r in rows if r.regular_macs is not None]

    def inside(path: str, outer: str) -> bool:  # "" is the root layer: everything else is inside
        return path != outer and (outer == "" or path.startswith(outer + "."))

    leaves = [(i, c) for i, c in enumerate(calls) if rows[i].leaf
              and not any(inside(rows[i].path, p) for p in compared)]
    for j, (i, c) in enumerate(leaves):
        if not isinstance(c.module, DepthwiseConv):
            continue
        between = []
        for k, d in leaves[j + 1:]:
            if isinstance(d.module, (BatchNorm, nnx.BatchNorm)):
                between.append(k)
                continue
            pw, out = d.module, rows[k].output_shape
            if isinstance(pw, PointwiseConv) and pw.in_features == c.module.out_features:
                params, macs = regular_conv_cost(
                    c.module.in_features, pw.out_features, c.module.kernel_size, out,
                    bias=pw.use_bias)
                parts = [i, *between, k]
                rows[k] = _with(rows[k], params, macs, sum(rows[n].params for n in parts),
                                sum(rows[n].macs for n in parts))
            break


def _with(row: Row, reg_params: int, reg_macs: int, sep_params: int, sep_macs: int) -> Row:
    return dataclasses.replace(row, regular_params=reg_params, regular_macs=reg_macs,
                               separable_params=sep_params, separable_macs=sep_macs)


def summary(
    model: nnx.Module,
    input_shape: Sequence[int],
    *,
    dtype: Any = jnp.float32,
    train: bool = False,
) -> Summary:
    """Parameters and multiply-adds per layer of ``model`` called on an input of ``input_shape``.

    Args:
      model: any ``flax.nnx.Module`` whose arithmetic lives in jaxdsc layers
        (and ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.BatchNorm``); it is not
        modified and nothing is computed.
      input_shape: e.g. ``(1, 224, 224, 3)`` (NHWC); multiply-adds scale with
        the batch size, so ``(1, ...)`` gives the cost per example.
      dtype: input dtype.
      train: trace in training mode (BatchNorm batch statistics); the counts
        are the same, eval mode (the default) avoids BatchNorm's
        one-value-per-channel restriction.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}")
    shape = tuple(_checks.positive_int(f"input_shape[{i}]", d) for i, d in enumerate(input_shape))
    calls = _trace(model, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), train)

    rows: list[Row] = []
    seen: set[int] = set()
    uncounted: list[str] = []
    for i, c in enumerate(calls):
        first = id(c.module) not in seen
        seen.add(id(c.module))
        out = _shapes(c.out)
        params = param_count(c.module) if first else 0
        path = ".".join(map(str, c.path))
        if c.leaf:
            if not isinstance(out, tuple) or not all(isinstance(d, int) for d in out):
                raise ValueError(f"layer {path} returned {out}, expected one array")
            macs: int | None = leaf_macs(c.module, out)
        else:
            macs = 0
            for d in calls[i + 1:]:
                if d.depth <= c.depth:
                    break
                if d.leaf:
                    macs += leaf_macs(d.module, _shapes(d.out))
            if _own_params(c.module):
                macs = None
                uncounted.append(path)
        row = Row(path, type(c.module).__name__, out, params, macs, c.depth, c.leaf)
        if isinstance(c.module, SEPARABLE_TYPES) and macs is not None:
            reg = regular_equivalent(c.module, out)
            row = _with(row, *reg, param_count(c.module), macs)
        rows.append(row)
    if not isinstance(model, _LAYERS) and _own_params(model):
        uncounted.insert(0, "")  # the model's own parameters, used by code no formula covers
    _pair_rows(rows, calls)
    total_macs = sum(r.macs for r in rows if r.leaf)
    return Summary(shape, tuple(rows), param_count(model), total_macs, tuple(uncounted))
