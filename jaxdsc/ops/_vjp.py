"""Derivatives of any order and mode for a bilinear op given by its kernels.

A depthwise (or pointwise) conv ``y = F(x, w)`` is bilinear, so its tangent
is ``F(dx, w) + F(x, dw)`` and its two backward maps are bilinear too:
``dx = Fx(g, w)`` (transposed conv) and ``dw = Fw(x, g)`` (weight
correlation). Each of the three is the transpose of the others::

    F (x, w):  x <- Fx(g, w),  w <- Fw(x, g)
    Fx(g, w):  g <- F(u, w),   w <- Fw(u, g)
    Fw(x, g):  x <- Fx(g, v),  g <- F(x, v)

so three fast kernels give ``jax.jvp``, ``jax.grad``, ``jax.linearize`` and
any composition (Hessian-vector products) without autodiff ever looking inside
them (the native kernels are opaque to JAX). Each op is a ``jax.custom_jvp``
whose tangent is a :class:`jaxdsc.ops._linear.Linear` map with the table
above as its transpose. An optional fused ``both(x, g, w) -> (dx, dw)`` kernel
serves the reverse-mode step when both cotangents are needed; an optional bias
family (:class:`BiasKernels`) adds ``F(x, w) + b`` with its fused backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdsc.ops._linear import Linear, custom_linear_jvp

Kernel = Callable[[jax.Array, jax.Array], jax.Array]
BothKernel = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class BiasKernels(NamedTuple):
    """Kernels of ``F(x, w) + b`` (bias over the last axis of the output).

    ``forward(x, w, b)``; ``grad_kernel_bias(x, g) -> (Fw(x, g), sum(g))``;
    ``grad_all(x, g, w) -> (Fx(g, w), Fw(x, g), sum(g))`` or None.
    """

    forward: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    grad_kernel_bias: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    grad_all: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] | None = None


class Family(NamedTuple):
    """The differentiable forward, input-gradient and weight-gradient ops.

    ``grad_both(x, g, w)`` is set when a fused kernel was given, ``affine(x,
    w, b)`` when bias kernels were.
    """

    conv: Kernel
    grad_input: Kernel
    grad_kernel: Kernel
    grad_both: BothKernel | None = None
    affine: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None


def _bias_sum(g: jax.Array) -> jax.Array:
    """``sum(g)`` over all but the last axis, accumulated in (at least) float32."""
    acc = jnp.promote_types(g.dtype, jnp.float32)
    return jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=acc).astype(g.dtype)


def _add(*terms: Any) -> Any:
    """Sum of the terms that are not None (None when all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def _bilinear(op: Callable, a: Any, b: Any, da: Any, db: Any) -> jax.Array:
    """The tangent of ``op(a, b)``: ``op(da, b) + op(a, db)``, absent terms skipped."""
    total = _add(None if da is None else op(da, b), None if db is None else op(a, db))
    if total is None:  # another output of the same map moves; this one does not
        out = jax.eval_shape(op, a, b)
        return jnp.zeros(out.shape, out.dtype)
    return total


def _bias_tangent(tg: jax.Array | None, g: jax.Array) -> jax.Array:
    return jnp.zeros(g.shape[-1:], g.dtype) if tg is None else _bias_sum(tg)


def make_family(
    fwd: Kernel,
    dx: Kernel,
    dw: Kernel,
    both: BothKernel | None = None,
    *,
    bias: BiasKernels | None = None,
) -> Family:
    """Differentiable ops from ``fwd(x, w)``, ``dx(g, w)`` and ``dw(x, g)`` (geometry fixed).

    ``both(x, g, w)``, if given, must equal ``(dx(g, w), dw(x, g))``.
    """
    ops: dict[str, Callable] = {}

    def conv(x, w):
        return ops["conv"](x, w)

    def grad_input(g, w):
        return ops["grad_input"](g, w)

    def grad_kernel(x, g):
        return ops["grad_kernel"](x, g)

    def conv_t(res, cts, needed):
        (x, w), (g,) = res, cts
        if both is not None and all(needed):
            return ops["grad_both"](x, g, w)
        return (grad_input(g, w) if needed[0] else None, grad_kernel(x, g) if needed[1] else None)

    def grad_input_t(res, cts, needed):
        (g, w), (u,) = res, cts
        return (conv(u, w) if needed[0] else None, grad_kernel(u, g) if needed[1] else None)

    def grad_kernel_t(res, cts, needed):
        (x, g), (v,) = res, cts
        return (grad_input(g, v) if needed[0] else None, conv(x, v) if needed[1] else None)

    def tangent(op: Callable, transpose: Callable, name: str) -> Linear:
        return Linear(lambda res, lin: (_bilinear(op, *res, *lin),), transpose, name)

    ops["conv"] = custom_linear_jvp(fwd, tangent(conv, conv_t, "conv"))
    ops["grad_input"] = custom_linear_jvp(dx, tangent(grad_input, grad_input_t, "grad_input"))
    ops["grad_kernel"] = custom_linear_jvp(dw, tangent(grad_kernel, grad_kernel_t, "grad_kernel"))

    if both is not None:
        # (dx, dw) = (Fx(g, w), Fw(x, g)); against cotangents (u, v).
        def both_apply(res, lin):
            x, g, w = res
            tx, tg, tw = lin
            return _bilinear(grad_input, g, w, tg, tw), _bilinear(grad_kernel, x, g, tx, tg)

        def both_t(res, cts, needed):
            (x, g, w), (u, v) = res, cts
            return (
                grad_input(g, v) if needed[0] else None,
                conv(u, w) + conv(x, v) if needed[1] else None,
                grad_kernel(u, g) if needed[2] else None,
            )

        ops["grad_both"] = custom_linear_jvp(both, Linear(both_apply, both_t, "grad_both"))

    if bias is not None:
        _add_bias_ops(ops, bias, both)
    return Family(conv, grad_input, grad_kernel, ops.get("grad_both"), ops.get("affine"))


def _add_bias_ops(ops: dict[str, Callable], bias: BiasKernels, both: BothKernel | None) -> None:
    """``affine(x, w, b) = conv(x, w) + b`` and its backward ops, into ``ops``."""
    conv, grad_input, grad_kernel = ops["conv"], ops["grad_input"], ops["grad_kernel"]

    def affine_apply(res, lin):
        x, w = res
        tx, tw, tb = lin
        y = _bilinear(conv, x, w, tx, tw)
        return (y if tb is None else y + tb,)

    def affine_t(res, cts, needed):
        (x, w), (g,) = res, cts
        if all(needed) and bias.grad_all is not None:
            return ops["grad_all"](x, g, w)
        if needed[1] and needed[2]:
            return (grad_input(g, w) if needed[0] else None, *ops["grad_kernel_bias"](x, g))
        if needed[0] and needed[1] and both is not None:
            return (*ops["grad_both"](x, g, w), None)
        return (
            grad_input(g, w) if needed[0] else None,
            grad_kernel(x, g) if needed[1] else None,
            _bias_sum(g) if needed[2] else None,
        )

    # (dw, db) = (Fw(x, g), sum g); against cotangents (v, t).
    def kernel_bias_apply(res, lin):
        x, g = res
        tx, tg = lin
        return _bilinear(grad_kernel, x, g, tx, tg), _bias_tangent(tg, g)

    def kernel_bias_t(res, cts, needed):
        (x, g), (v, t) = res, cts
        return (grad_input(g, v) if needed[0] else None, ops["affine"](x, v, t) if needed[1] else None)

    ops["affine"] = custom_linear_jvp(
        bias.forward, Linear(affine_apply, affine_t, "affine"), residuals=lambda a, _: a[:2]
    )
    ops["grad_kernel_bias"] = custom_linear_jvp(
        bias.grad_kernel_bias, Linear(kernel_bias_apply, kernel_bias_t, "grad_kernel_bias")
    )
    if bias.grad_all is None:
        return

    # (dx, dw, db) = (Fx(g, w), Fw(x, g), sum g); against cotangents (u, v, t).
    def all_apply(res, lin):
        x, g, w = res
        tx, tg, tw = lin
        return (
            _bilinear(grad_input, g, w, tg, tw),
            _bilinear(grad_kernel, x, g, tx, tg),
            _bias_tangent(tg, g),
        )

    def all_t(res, cts, needed):
        (x, g, w), (u, v, t) = res, cts
        return (
            grad_input(g, v) if needed[0] else None,
            conv(u, w) + ops["affine"](x, v, t) if needed[1] else None,
            grad_kernel(u, g) if needed[2] else None,
        )

    ops["grad_all"] = custom_linear_jvp(bias.grad_all, Linear(all_apply, all_t, "grad_all"))
