"""Custom VJPs for a bilinear op from its three kernels, closed under differentiation.

A depthwise conv ``y = F(x, w)`` is bilinear, so its two backward maps are
bilinear too: ``dx = Fx(g, w)`` (transposed conv) and ``dw = Fw(x, g)``
(weight correlation). The cotangent maps of each of the three are again made
of the same three kernels::

    F (x, w) --ct g--> (Fx(g, w), Fw(x, g))
    Fx(g, w) --ct u--> (F(u, w),  Fw(u, g))
    Fw(x, g) --ct v--> (Fx(g, v), F(x, v))

so wrapping each in a ``jax.custom_vjp`` whose backward calls the wrapped
versions gives gradients of any order from three fast kernels, without
autodiff ever looking inside them (the native kernels are opaque to JAX).
An optional fused ``both(x, g, w) -> (dx, dw)`` kernel serves the first-order
backward in one pass; its own cotangent map is again made of the three.
Forward-mode (``jax.jvp``) is not available through ``custom_vjp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

Kernel = Callable[[jax.Array, jax.Array], jax.Array]
BothKernel = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class Family(NamedTuple):
    """The differentiable forward, input-gradient and weight-gradient ops."""

    conv: Kernel
    grad_input: Kernel
    grad_kernel: Kernel


def make_family(fwd: Kernel, dx: Kernel, dw: Kernel, both: BothKernel | None = None) -> Family:
    """Wrap ``fwd(x, w)``, ``dx(g, w)`` and ``dw(x, g)`` (all geometry fixed) in custom VJPs.

    ``both(x, g, w)``, if given, must equal ``(dx(g, w), dw(x, g))``.
    """

    @jax.custom_vjp
    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return fwd(x, w)

    @jax.custom_vjp
    def grad_input(g: jax.Array, w: jax.Array) -> jax.Array:
        return dx(g, w)

    @jax.custom_vjp
    def grad_kernel(x: jax.Array, g: jax.Array) -> jax.Array:
        return dw(x, g)

    # The forward rules call the wrapped ops, not the raw kernels: under an
    # outer differentiation (grad of grad) their inputs are outer tracers, and
    # only the wrapped ops know how to differentiate.
    def conv_fwd(x, w):
        return conv(x, w), (x, w)

    def conv_bwd(res, g):
        x, w = res
        if both is not None:
            return grad_both(x, g, w)
        return grad_input(g, w), grad_kernel(x, g)

    @jax.custom_vjp
    def grad_both(x: jax.Array, g: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return both(x, g, w)  # type: ignore[misc]

    def grad_both_fwd(x, g, w):
        return grad_both(x, g, w), (x, g, w)

    def grad_both_bwd(res, cts):
        # (dx, dw) = (Fx(g, w), Fw(x, g)) against cotangents (u, v).
        x, g, w = res
        u, v = cts
        return grad_input(g, v), conv(u, w) + conv(x, v), grad_kernel(u, g)

    def grad_input_fwd(g, w):
        return grad_input(g, w), (g, w)

    def grad_input_bwd(res, u):
        g, w = res
        return conv(u, w), grad_kernel(u, g)

    def grad_kernel_fwd(x, g):
        return grad_kernel(x, g), (x, g)

    def grad_kernel_bwd(res, v):
        x, g = res
        return grad_input(g, v), conv(x, v)

    conv.defvjp(conv_fwd, conv_bwd)
    grad_input.defvjp(grad_input_fwd, grad_input_bwd)
    grad_kernel.defvjp(grad_kernel_fwd, grad_kernel_bwd)
    grad_both.defvjp(grad_both_fwd, grad_both_bwd)
    return Family(conv, grad_input, grad_kernel)
