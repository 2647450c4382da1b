"""Train-mode batch norm over the last axis, with an optional fused ReLU.

Implementations (the same function; ``tests/test_ops_batchnorm.py`` checks
values and gradients of both against float64):

* ``"xla"``: :func:`batch_norm_train` (two-pass variance, closed-form VJP)
  followed by ``jax.nn.relu``: XLA fusions, any backend and float dtype.
* ``"native"``: the C++ kernels of :mod:`jaxdsc.ops.native` (CPU, float32):
  statistics in one read of ``x`` (two-pass per cached chunk of rows, chunks
  merged in double), normalise + ReLU in one more pass; the backward is two
  passes with the ReLU mask recomputed from ``x``. XLA's fusions of the same
  function ran at 23-44 GB/s effective and were the largest part of the CPU
  training step (BENCHMARKS.md). Higher-order derivatives use the ``"xla"``
  formulas for the derivative terms (values stay native).

``"auto"`` picks ``"native"`` on CPU for float32 inputs of at least
:data:`NATIVE_MIN_ELEMENTS` values, else ``"xla"``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdsc.ops._linear import Linear, custom_linear_jvp, jvp_of
from jaxdsc.ops._select import native_or_xla

BN_IMPLS = ("xla", "native")

# "auto" uses the native kernels from this many values on: below it the call
# and thread hand-off cost more than XLA's fusions of a tiny tensor.
NATIVE_MIN_ELEMENTS = 1 << 15


# ------------------------------------------------------------------ xla --


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm over all but the last axis of ``x`` ``(N, *spatial, C)``.

    Returns ``(y, mean, var)``: ``y = (x - mean) * rsqrt(var + epsilon) * scale
    + bias`` with the batch mean and biased variance (two-pass variance: as
    accurate as torch's Welford for float32 activations). The backward is the
    closed form: two reductions and one elementwise pass over the activations,
    where autodiff of the forward takes several more; batch norm was the
    largest part of the CPU training step (issue 5, BENCHMARKS.md).
    """
    return _xla_op(float(epsilon))(x, scale, bias)


def _bn_train_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(epsilon, res, cotangents):
    del epsilon
    x, mean, rstd, scale = res
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    xhat = (x - mean) * rstd
    dbias = jnp.sum(g, axis=axes)
    dscale = jnp.sum(g * xhat, axis=axes)
    # dx = a * g + b + c * xhat, per-channel a, b, c: the y term
    # scale * rstd * (g - mean(g) - xhat * mean(g * xhat)), plus the mean and
    # var outputs' own terms (zero when they are only running statistics).
    a = scale * rstd
    b = (g_mean - a * dbias) / n
    c = (2 * g_var / rstd - a * dscale) / n
    dx = a * g + b + c * xhat
    return dx, dscale, dbias


def _bn_transpose(epsilon: float, native: bool, relu: bool = False):
    """The backward pass as the transpose of the tangent map, from residuals (x, scale, bias, mean, var)."""

    def transpose(res, cts, needed):
        del needed  # one pass yields all three
        x, scale, bias, mean, var = res
        if native:
            return native_backward(x, cts[0], scale, bias, mean, var, *cts[1:], epsilon, relu)
        return _bn_train_bwd(epsilon, (x, mean, jax.lax.rsqrt(var + epsilon), scale), cts)

    return transpose


def _keep_statistics(args, out):
    return (*args, out[1], out[2])


@functools.lru_cache(maxsize=64)
def _xla_op(epsilon: float):
    """Forward and reverse mode (any order) with the closed-form backward."""

    def forward(x, scale, bias):
        return _bn_train_fwd(x, scale, bias, epsilon)[0]

    tangent = Linear(jvp_of(forward, 3), _bn_transpose(epsilon, native=False), "batch_norm")
    return custom_linear_jvp(forward, tangent, residuals=_keep_statistics)


# --------------------------------------------------------------- native --


def _reference_forward(x2, scale, bias, epsilon, relu):
    """The native forward's function in jnp (for derivatives of order >= 2)."""
    (y, mean, var), _ = _bn_train_fwd(x2, scale, bias, epsilon)
    return (jax.nn.relu(y) if relu else y), mean, var


def _reference_backward(x2, gy, scale, bias, mean, var, g_mean, g_var, epsilon, relu):
    """The native backward's function in jnp (for derivatives of order >= 3)."""
    rstd = jax.lax.rsqrt(var + epsilon)
    dz = jnp.where((x2 - mean) * (rstd * scale) + bias > 0, gy, 0.0) if relu else gy
    return _bn_train_bwd(epsilon, (x2, mean, rstd, scale), (dz, g_mean, g_var))


def _out_shapes(x2: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Both targets return an (M, C) array and two (C,) vectors, float32."""
    m, c = x2.shape
    vec = jax.ShapeDtypeStruct((c,), jnp.float32)
    return jax.ShapeDtypeStruct((m, c), jnp.float32), vec, vec


def _attrs(epsilon: float, relu: bool) -> dict[str, np.generic]:
    return {"epsilon": np.float32(epsilon), "relu": np.int32(bool(relu))}


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def native_forward(x2, scale, bias, epsilon: float, relu: bool):
    """``(y, mean, var)`` of ``x2`` ``(M, C)`` float32 by the native kernel."""
    return tuple(
        jax.ffi.ffi_call("jaxdsc_bn_forward", _out_shapes(x2), vmap_method="sequential")(
            x2, scale, bias, **_attrs(epsilon, relu)
        )
    )


@native_forward.defjvp
def _native_forward_jvp(epsilon, relu, primals, tangents):
    _, t = jax.jvp(lambda *a: _reference_forward(*a, epsilon, relu), primals, tangents)
    return native_forward(*primals, epsilon, relu), t


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9))
def native_backward(x2, gy, scale, bias, mean, var, g_mean, g_var, epsilon: float, relu: bool):
    """``(dx, dscale, dbias)``: the VJP of :func:`native_forward` for cotangents ``gy, g_mean, g_var``."""
    return tuple(
        jax.ffi.ffi_call("jaxdsc_bn_backward", _out_shapes(x2), vmap_method="sequential")(
            x2, gy, scale, bias, mean, var, g_mean, g_var, **_attrs(epsilon, relu)
        )
    )


@native_backward.defjvp
def _native_backward_jvp(epsilon, relu, primals, tangents):
    _, t = jax.jvp(lambda *a: _reference_backward(*a, epsilon, relu), primals, tangents)
    return native_backward(*primals, epsilon, relu), t


@functools.lru_cache(maxsize=64)
def _native_bn(epsilon: float, relu: bool):
    """Native values and backward; forward-mode tangents from the reference formulas."""

    def forward(x2, scale, bias):
        return native_forward(x2, scale, bias, epsilon, relu)

    def reference(x2, scale, bias):
        return _reference_forward(x2, scale, bias, epsilon, relu)

    tangent = Linear(jvp_of(reference, 3), _bn_transpose(epsilon, True, relu), "native_batch_norm")
    return custom_linear_jvp(forward, tangent, residuals=_keep_statistics)


def self_check() -> bool:
    """Both native targets on a small odd case (C = 19, M = 37) against numpy (run at load).

    Called by :func:`jaxdsc.ops.native.available`; False withholds ``"native"``.
    """
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 19)).astype(np.float32)
    scale, bias = (rng.standard_normal(19).astype(np.float32) for _ in range(2))
    gy, gm, gv = (rng.standard_normal(s).astype(np.float32) for s in ((37, 19), 19, 19))
    try:
        with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
            y, mean, var = (np.asarray(v) for v in native_forward(x, scale, bias, 1e-3, False))
            dx, dscale, dbias = (
                np.asarray(v)
                for v in native_backward(x, gy, scale, bias, mean, var, gm, gv, 1e-3, False)
            )
    except Exception:  # any failure here means "do not use native batch norm"
        return False
    m, v = x.mean(0), x.var(0)
    xhat = (x - m) / np.sqrt(v + 1e-3)
    a = scale / np.sqrt(v + 1e-3)
    dx_ref = a * (gy - gy.mean(0) - xhat * (gy * xhat).mean(0)) + gm / 37 + gv * 2 * (x - m) / 37
    return all(
        got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=1e-4)
        for got, ref in (
            (y, xhat * scale + bias),
            (mean, m),
            (var, v),
            (dx, dx_ref),
            (dscale, (gy * xhat).sum(0)),
            (dbias, gy.sum(0)),
        )
    )


# ---------------------------------------------------------------- entry --


def _native_supports(x: jax.Array, scale: jax.Array, bias: jax.Array) -> bool:
    from jaxdsc.ops import native

    return (
        jax.default_backend() == "cpu"
        and x.ndim >= 1
        and all(jnp.dtype(a.dtype) == jnp.float32 for a in (x, scale, bias))
        and x.size >= 1
        and native.batch_norm_available()
    )


def select_batch_norm_impl(
    x: jax.Array, scale: jax.Array, bias: jax.Array, impl: str = "auto"
) -> str:
    """Name of the implementation ``impl`` resolves to for these operands."""
    return native_or_xla(
        impl,
        BN_IMPLS,
        supported=lambda: _native_supports(x, scale, bias),
        large=x.size >= NATIVE_MIN_ELEMENTS,
        requirement=lambda: (
            "impl='native' needs the CPU backend, the native library "
            "(jaxdsc.ops.native.batch_norm_available()) and float32 x, scale and bias; "
            f"got x {x.dtype}, scale {scale.dtype}, bias {bias.dtype}"
        ),
    )


def batch_norm_act_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    *,
    relu: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm of ``x`` ``(N, *spatial, C)``, then ReLU if ``relu``.

    Returns ``(y, mean, var)`` with the batch mean and biased variance; see
    :func:`batch_norm_train` for the normalisation. ``impl``: ``"auto"``,
    ``"xla"`` or ``"native"`` (module docstring).
    """
    if x.ndim < 1 or scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(
            "x must be (N, ..., C) with scale and bias of shape (C,), got "
            f"x {x.shape}, scale {scale.shape}, bias {bias.shape}"
        )
    if select_batch_norm_impl(x, scale, bias, impl) == "xla":
        y, mean, var = batch_norm_train(x, scale, bias, epsilon)
        return (jax.nn.relu(y) if relu else y), mean, var
    y, mean, var = _native_bn(float(epsilon), bool(relu))(x.reshape(-1, x.shape[-1]), scale, bias)
    return y.reshape(x.shape), mean, var
