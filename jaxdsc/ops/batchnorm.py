"""Train-mode batch norm over the last axis, with an optional fused ReLU.

Implementations (the same function; ``tests/test_ops_batchnorm.py`` checks
values and gradients of both against float64):

* ``"xla"``: :func:`batch_norm_train` (two-pass variance, closed-form VJP)
  followed by ``jax.nn.relu``: XLA fusions, any backend and float dtype.
* ``"native"``: C++ kernels (CPU, float32; the ``"batchnorm"`` family of the
  library :mod:`jaxdsc.ops.native` loads, registered by this module):
  statistics in one read of ``x`` (two-pass per cached chunk of rows, chunks
  merged in double), normalise + ReLU in one more pass; the backward is two
  passes with the ReLU mask recomputed from ``x``. XLA's fusions of the same
  function ran at 23-44 GB/s effective and were the largest part of the CPU
  training step (BENCHMARKS.md). Higher-order derivatives use the ``"xla"``
  formulas for the derivative terms (values stay native).

``"auto"`` picks ``"native"`` in the CPU branch of the program for float32
inputs of at least :data:`NATIVE_MIN_ELEMENTS` values, else ``"xla"``
(:mod:`jaxdsc.ops._select`). Under a batch-sharded ``jit`` the native calls
run per shard: the statistics and the backward's reductions are per-shard
sums all-reduced over the devices (computed with the ``"xla"`` formulas on
each shard, :mod:`jaxdsc.ops._partition`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdsc.ops import native
from jaxdsc.ops._linear import Linear, custom_linear_jvp, jvp_of
from jaxdsc.ops._partition import BATCH, SUM, batch_op
from jaxdsc.ops._select import native_or_xla, platform_of_default_backend, with_policy

BN_IMPLS = ("xla", "native")
FAMILY = "batchnorm"
TARGETS = ("jaxdsc_bn_forward", "jaxdsc_bn_backward")

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


def _bn_transpose(epsilon: float, native: bool, relu: bool = False, portable: bool = False):
    """The backward pass as the transpose of the tangent map, from residuals (x, scale, bias, mean, var).

    ``portable``: the native backward in the CPU branch of the program, the
    ``"xla"`` formulas elsewhere (:func:`_auto_backward`).
    """

    def transpose(res, cts, needed):
        del needed  # one pass yields all three
        x, scale, bias, mean, var = res
        if native:
            backward = _auto_backward if portable else native_backward
            return backward(x, cts[0], scale, bias, mean, var, *cts[1:], epsilon, relu)
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


def _sharded_forward(epsilon: float, relu: bool):
    """Per-shard forward: statistics as all-reduced per-shard sums (two-pass variance)."""

    def per_shard(axes, x2, scale, bias):
        n = x2.shape[0] * lax.psum(1, axes)
        mean = lax.psum(jnp.sum(x2, axis=0), axes) / n
        d = x2 - mean
        var = lax.psum(jnp.sum(d * d, axis=0), axes) / n
        y = d * (lax.rsqrt(var + epsilon) * scale) + bias
        return (jax.nn.relu(y) if relu else y), mean, var

    return per_shard


def _sharded_backward(epsilon: float, relu: bool):
    """Per-shard backward: the closed form with all-reduced per-channel sums."""

    def per_shard(axes, x2, gy, scale, bias, mean, var, g_mean, g_var):
        n = x2.shape[0] * lax.psum(1, axes)
        rstd = lax.rsqrt(var + epsilon)
        xhat = (x2 - mean) * rstd
        dz = jnp.where(xhat * scale + bias > 0, gy, 0.0) if relu else gy
        dbias = lax.psum(jnp.sum(dz, axis=0), axes)
        dscale = lax.psum(jnp.sum(dz * xhat, axis=0), axes)
        a = scale * rstd
        dx = a * dz + (g_mean - a * dbias) / n + ((2 * g_var / rstd - a * dscale) / n) * xhat
        return dx, dscale, dbias

    return per_shard


@functools.lru_cache(maxsize=64)
def _kernels(epsilon: float, relu: bool):
    """The forward and backward FFI calls for one (epsilon, relu), with their per-shard forms."""

    def fwd(x2, scale, bias):
        return tuple(
            jax.ffi.ffi_call("jaxdsc_bn_forward", _out_shapes(x2), vmap_method="sequential")(
                x2, scale, bias, **_attrs(epsilon, relu)
            )
        )

    def bwd(x2, gy, scale, bias, mean, var, g_mean, g_var):
        return tuple(
            jax.ffi.ffi_call("jaxdsc_bn_backward", _out_shapes(x2), vmap_method="sequential")(
                x2, gy, scale, bias, mean, var, g_mean, g_var, **_attrs(epsilon, relu)
            )
        )

    return (
        batch_op(fwd, batched=(True, False, False), outputs=(BATCH, SUM, SUM),
                 per_shard=_sharded_forward(epsilon, relu)),
        batch_op(bwd, batched=(True, True, False, False, False, False, False, False),
                 outputs=(BATCH, SUM, SUM), per_shard=_sharded_backward(epsilon, relu)),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def native_forward(x2, scale, bias, epsilon: float, relu: bool):
    """``(y, mean, var)`` of ``x2`` ``(M, C)`` float32 by the native kernel."""
    return tuple(_kernels(epsilon, relu)[0](x2, scale, bias))


@native_forward.defjvp
def _native_forward_jvp(epsilon, relu, primals, tangents):
    _, t = jax.jvp(lambda *a: _reference_forward(*a, epsilon, relu), primals, tangents)
    return native_forward(*primals, epsilon, relu), t


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9))
def native_backward(x2, gy, scale, bias, mean, var, g_mean, g_var, epsilon: float, relu: bool):
    """``(dx, dscale, dbias)``: the VJP of :func:`native_forward` for cotangents ``gy, g_mean, g_var``."""
    return tuple(_kernels(epsilon, relu)[1](x2, gy, scale, bias, mean, var, g_mean, g_var))


@native_backward.defjvp
def _native_backward_jvp(epsilon, relu, primals, tangents):
    _, t = jax.jvp(lambda *a: _reference_backward(*a, epsilon, relu), primals, tangents)
    return native_backward(*primals, epsilon, relu), t


def _auto_forward(x2, scale, bias, epsilon, relu):
    """:func:`native_forward` in the CPU branch of the program, the ``"xla"`` formulas elsewhere."""
    return lax.platform_dependent(
        x2, scale, bias,
        cpu=lambda *a: native_forward(*a, epsilon, relu),
        default=lambda *a: _reference_forward(*a, epsilon, relu),
    )


def _auto_backward(x2, gy, scale, bias, mean, var, g_mean, g_var, epsilon, relu):
    """:func:`native_backward` in the CPU branch of the program, the ``"xla"`` formulas elsewhere."""
    return lax.platform_dependent(
        x2, gy, scale, bias, mean, var, g_mean, g_var,
        cpu=lambda *a: native_backward(*a, epsilon, relu),
        default=lambda *a: _reference_backward(*a, epsilon, relu),
    )


@functools.lru_cache(maxsize=64)
def _native_bn(epsilon: float, relu: bool, portable: bool = False):
    """Native values and backward; forward-mode tangents from the reference formulas.

    ``portable``: the platform choice sits in the raw kernels the tangent map
    and its transpose call (both branches keep the same residuals), so
    differentiation never goes through ``lax.platform_dependent`` (linearising
    and transposing a cond made tracing several times slower).
    """
    kernel = _auto_forward if portable else native_forward

    def forward(x2, scale, bias):
        return kernel(x2, scale, bias, epsilon, relu)

    def reference(x2, scale, bias):
        return _reference_forward(x2, scale, bias, epsilon, relu)

    tangent = Linear(
        jvp_of(reference, 3), _bn_transpose(epsilon, True, relu, portable), "native_batch_norm"
    )
    return custom_linear_jvp(forward, tangent, residuals=_keep_statistics)


def self_check() -> str:
    """Both native targets on a small odd case (C = 19, M = 37) against numpy; "" if they agree.

    Run once by :mod:`jaxdsc.ops.native` on first use; a failure withholds ``"native"``.
    """
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 19)).astype(np.float32)
    scale, bias = (rng.standard_normal(19).astype(np.float32) for _ in range(2))
    gy, gm, gv = (rng.standard_normal(s).astype(np.float32) for s in ((37, 19), 19, 19))
    y, mean, var = (np.asarray(v) for v in native_forward(x, scale, bias, 1e-3, False))
    dx, dscale, dbias = (
        np.asarray(v) for v in native_backward(x, gy, scale, bias, mean, var, gm, gv, 1e-3, False)
    )
    m, v = x.mean(0), x.var(0)
    xhat = (x - m) / np.sqrt(v + 1e-3)
    a = scale / np.sqrt(v + 1e-3)
    dx_ref = a * (gy - gy.mean(0) - xhat * (gy * xhat).mean(0)) + gm / 37 + gv * 2 * (x - m) / 37
    ok = all(
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
    return "" if ok else "a target disagrees with the numpy reference"


native.register_family(FAMILY, TARGETS, self_check)


def native_available() -> bool:
    """True when the native batch-norm kernels are built, loaded and self-checked."""
    return native.available(FAMILY)


# ---------------------------------------------------------------- entry --


def _native_supports(x: jax.Array, scale: jax.Array, bias: jax.Array) -> bool:
    return (
        x.ndim >= 1
        and all(jnp.dtype(a.dtype) == jnp.float32 for a in (x, scale, bias))
        and x.size >= 1
        and native_available()
    )


def select_batch_norm_impl(
    x: jax.Array, scale: jax.Array, bias: jax.Array, impl: str = "auto", *, platform: str | None = None
) -> str:
    """Name of the implementation ``impl`` resolves to for these operands.

    ``platform``: ``"cpu"`` or ``"default"`` (other platforms); None: that of
    ``jax.default_backend()``. The active :func:`jaxdsc.ops.impl_policy` applies.
    """
    return native_or_xla(
        with_policy("batchnorm", impl),
        BN_IMPLS,
        supported=lambda: _native_supports(x, scale, bias),
        large=x.size >= NATIVE_MIN_ELEMENTS,
        requirement=lambda: (
            "impl='native' needs the native library "
            "(jaxdsc.ops.native.available('batchnorm')) and float32 x, scale and bias (CPU only); "
            f"got x {x.dtype}, scale {scale.dtype}, bias {bias.dtype}"
        ),
        platform=platform or platform_of_default_backend(),
    )


def _xla_bn(x, scale, bias, epsilon, relu):
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)
    return (jax.nn.relu(y) if relu else y), mean, var


def _native_bn_nd(x, scale, bias, epsilon, relu):
    y, mean, var = _native_bn(float(epsilon), bool(relu))(x.reshape(-1, x.shape[-1]), scale, bias)
    return y.reshape(x.shape), mean, var


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
    fns = {"xla": _xla_bn, "native": _native_bn_nd}
    if with_policy("batchnorm", impl) != "auto":
        name = select_batch_norm_impl(x, scale, bias, impl)
        return fns[name](x, scale, bias, epsilon, relu)
    cpu, other = (select_batch_norm_impl(x, scale, bias, platform=p) for p in ("cpu", "default"))
    if cpu == other:
        return fns[cpu](x, scale, bias, epsilon, relu)
    # CPU native, elsewhere xla (other never picks native).
    y, mean, var = _native_bn(float(epsilon), bool(relu), True)(x.reshape(-1, x.shape[-1]), scale, bias)
    return y.reshape(x.shape), mean, var
