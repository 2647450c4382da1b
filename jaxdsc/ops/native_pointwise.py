"""Native pointwise (1x1) conv GEMM for CPU through ``jax.ffi`` (``impl="native"``).

The C++ GEMM lives in the library that :mod:`jaxdsc.ops.native` loads (its
targets ``jaxdsc_pw_*`` are registered there); this module holds the FFI calls,
their differentiable (any-order) wrappers and the load-time self-check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdsc.ops import native
from jaxdsc.ops._vjp import BiasKernels, Family, make_family
from jaxdsc.ops.native import _DTYPES


def _pw_forward(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return jax.ffi.ffi_call("jaxdsc_pw_forward", out, vmap_method="sequential")(x, w, b)


def _pw_grad_input(g: jax.Array, w: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((g.shape[0], w.shape[0]), g.dtype)
    return jax.ffi.ffi_call("jaxdsc_pw_grad_input", out, vmap_method="sequential")(g, w)


def _pw_grad_kernel_bias(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = (
        jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), x.dtype),
        jax.ShapeDtypeStruct((g.shape[1],), x.dtype),
    )
    dw, db = jax.ffi.ffi_call("jaxdsc_pw_grad_kernel", out, vmap_method="sequential")(x, g)
    return dw, db


def _pw_grad_all(
    x: jax.Array, g: jax.Array, w: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dw, db) in one pass over g: each chunk of g rows feeds dx, then dw, from cache."""
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(w.shape, x.dtype),
        jax.ShapeDtypeStruct((w.shape[1],), x.dtype),
    )
    return jax.ffi.ffi_call("jaxdsc_pw_grad_all", out, vmap_method="sequential")(x, g, w)


def _pw_forward_nobias(x: jax.Array, w: jax.Array) -> jax.Array:
    return _pw_forward(x, w, jnp.zeros((w.shape[1],), x.dtype))


# Backward pass as one kernel (dx, dw, db from a single pass over g), or as
# separate dx and (dw, db) kernels; a module switch for benchmarks.
PW_FUSED_BACKWARD = True


@functools.lru_cache(maxsize=2)
def _pw_ops(fused: bool) -> Family:
    """Differentiable (any order, forward and reverse mode) native pointwise ops on 2-D views."""
    return make_family(
        _pw_forward_nobias,
        _pw_grad_input,
        lambda x, g: _pw_grad_kernel_bias(x, g)[0],
        (lambda x, g, w: _pw_grad_all(x, g, w)[:2]) if fused else None,
        bias=BiasKernels(_pw_forward, _pw_grad_kernel_bias, _pw_grad_all if fused else None),
    )


def pointwise_supports(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> bool:
    """float32 or bfloat16 operands of one dtype, non-empty channel dims, library available."""
    dtype = jnp.dtype(x.dtype)
    return (
        dtype in _DTYPES
        and jnp.dtype(kernel.dtype) == dtype
        and (bias is None or jnp.dtype(bias.dtype) == dtype)
        and x.ndim >= 1
        and kernel.ndim == 2
        and min(kernel.shape) >= 1
        and native.pointwise_available()
    )


def pointwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``impl="native"`` pointwise conv: ``x (..., K) . kernel (K, N) + bias (N,)``."""
    ops = _pw_ops(PW_FUSED_BACKWARD)
    x2 = x.reshape(-1, x.shape[-1])
    y2 = ops.conv(x2, kernel) if bias is None else ops.affine(x2, kernel, bias)
    return y2.reshape(*x.shape[:-1], kernel.shape[-1])


def self_check() -> bool:
    """The pointwise targets on a small odd case against numpy (run by ``native.available``)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 7)).astype(np.float32)
    w = rng.standard_normal((7, 19)).astype(np.float32)
    b = rng.standard_normal((19,)).astype(np.float32)
    g = rng.standard_normal((23, 19)).astype(np.float32)
    try:
        with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
            y = np.asarray(jax.jit(_pw_forward)(x, w, b))
            dx = np.asarray(jax.jit(_pw_grad_input)(g, w))
            dw, db = (np.asarray(v) for v in jax.jit(_pw_grad_kernel_bias)(x, g))
            dx2, dw2, db2 = (np.asarray(v) for v in jax.jit(_pw_grad_all)(x, g, w))
    except Exception:  # any failure here means "do not use native pointwise"
        return False
    return all(
        got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=1e-4)
        for got, ref in (
            (y, x @ w + b),
            (dx, g @ w.T),
            (dw, x.T @ g),
            (db, g.sum(0)),
            (dx2, g @ w.T),
            (dw2, x.T @ g),
            (db2, g.sum(0)),
        )
    )
