"""Depthwise then pointwise conv, with the forward fused into one native kernel on CPU.

``separable_conv`` computes ``pointwise(depthwise(x) + dw_bias) + pw_bias``.
When both halves would run natively in the CPU branch of the program
(float32, ``impl`` resolving to ``"native"`` for both, enough rows for the
native GEMM) the forward is the fused
``jaxdsc_sep_forward`` kernel: each task computes a group of depthwise output
rows into an L2-resident buffer and runs the pointwise GEMM on it, so the
intermediate never makes the round trip through memory. The depthwise bias is
folded into the pointwise one (``pw_bias + dw_bias @ pw_kernel``). Other
platforms run the unfused pair (``lax.platform_dependent``,
:mod:`jaxdsc.ops._select`). The kernel is the ``"separable"`` family of the
library :mod:`jaxdsc.ops.native` loads, registered here; it needs the
depthwise and pointwise families.

Derivatives (``jax.grad``, ``jax.jvp``, any order) run the unfused pair, whose
forward keeps the intermediate for the pointwise weight gradient: the fused
kernel serves inference. ``tests/test_ops_separable.py`` checks the fused forward and
the gradients against the unfused composition and the ``"xla"`` path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdsc.ops import native, native_depthwise, native_pointwise
from jaxdsc.ops._linear import fast_primal
from jaxdsc.ops._partition import BATCH, batch_op
from jaxdsc.ops._select import op_impl, with_policy
from jaxdsc.ops.depthwise import DepthwiseCall, Pairs, depthwise_conv, make_call, select_impl
from jaxdsc.ops.pointwise import pointwise_conv, select_pointwise_impl

FAMILY = "separable"
SEP_TARGET = "jaxdsc_sep_forward"

# Module switch for benchmarks and tests: False always runs the unfused pair.
FUSED_FORWARD = True


def fused_available() -> bool:
    """True when the native library has the fused separable forward (and it passed its check)."""
    return native.available(FAMILY)


def _resolved(impl: str) -> tuple[str, str]:
    """The depthwise and pointwise impls ``impl`` means, after the active policy."""
    return (with_policy("depthwise", op_impl("depthwise", impl)),
            with_policy("pointwise", op_impl("pointwise", impl)))


def fused_supports(call: DepthwiseCall, impl: str, pw_kernel: jax.Array,
                   biases: Sequence[jax.Array | None]) -> bool:
    """Whether :func:`separable_conv` runs the fused forward (on CPU) for these operands."""
    f32 = jnp.dtype(jnp.float32)
    if not (FUSED_FORWARD and call.dtype == f32
            and jnp.dtype(pw_kernel.dtype) == f32
            and all(b is None or jnp.dtype(b.dtype) == f32 for b in biases)
            and fused_available()):
        return False
    dw_impl, pw_impl = _resolved(impl)
    if select_impl(replace(call, backend="cpu"), dw_impl) != "native":
        return False
    h = jax.ShapeDtypeStruct((call.batch, *call.out_spatial, pw_kernel.shape[0]), f32)
    return select_pointwise_impl(h, pw_kernel, biases[1], pw_impl, platform="cpu") == "native"


def _ffi_fused(x, wd, wp, b, call: DepthwiseCall):
    y_shape = (x.shape[0], *call.out_spatial, wp.shape[1])
    out = jax.ShapeDtypeStruct(native_depthwise.as5d(y_shape), x.dtype)
    y = jax.ffi.ffi_call(SEP_TARGET, out, vmap_method="sequential")(
        x.reshape(native_depthwise.as5d(x.shape)), native_depthwise.kernel4d(wd, call), wp, b,
        **native_depthwise.attrs(call)
    )
    return y.reshape(y_shape)


@functools.lru_cache(maxsize=512)
def _fused_kernel(call: DepthwiseCall):
    """The fused FFI call for one geometry, per example (split with the batch when sharded)."""
    return batch_op(lambda x, wd, wp, b: _ffi_fused(x, wd, wp, b, call),
                    batched=(True, False, False, False), outputs=(BATCH,))


def self_check() -> str:
    """The fused kernel on a small odd case against the numpy composition; "" if they agree."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    wd = rng.standard_normal((3, 3, 1, 6)).astype(np.float32)
    wp = rng.standard_normal((6, 5)).astype(np.float32)
    b = rng.standard_normal((5,)).astype(np.float32)
    call = make_call(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(wd.shape, wd.dtype),
                     strides=(1, 2), padding=((1, 1), (2, 1)), dilation=(1, 2))
    y = np.asarray(jax.jit(_ffi_fused, static_argnums=4)(x, wd, wp, b, call))
    xp = np.pad(np.repeat(x, 2, axis=-1), ((0, 0), (1, 1), (2, 1), (0, 0)))
    h = sum(xp[:, i:i + 5, 2 * j:2 * j + 5:2, :] * wd[i, j, 0] for i in range(3) for j in range(3))
    ref = h @ wp + b
    if y.shape != ref.shape or not np.allclose(y, ref, rtol=1e-4, atol=1e-4):
        return "the fused forward disagrees with the numpy reference"
    return ""


native.register_family(FAMILY, (SEP_TARGET,), self_check,
                       requires=(native_depthwise.FAMILY, native_pointwise.FAMILY))


@functools.lru_cache(maxsize=512)
def _fused_op(call: DepthwiseCall, impl: str, has_dw_bias: bool, has_pw_bias: bool, precision):
    """``f(x, wd, wp, *biases)``: fused primal, unfused derivatives, for one static geometry."""

    def unpack(biases):
        it = iter(biases)
        return (next(it) if has_dw_bias else None), (next(it) if has_pw_bias else None)

    def unfused(x, wd, wp, *biases):
        bd, bp = unpack(biases)
        h = depthwise_conv(x, wd, strides=call.strides, padding=call.padding, dilation=call.dilation,
                           impl=op_impl("depthwise", impl), precision=precision)
        if bd is not None:
            h = h + bd
        return pointwise_conv(h, wp, bp, precision=precision, impl=op_impl("pointwise", impl))

    def fused(x, wd, wp, *biases):
        bd, bp = unpack(biases)
        b = jnp.zeros((wp.shape[1],), wp.dtype) if bp is None else bp
        if bd is not None:
            b = b + jnp.dot(bd, wp, precision=lax.Precision.HIGHEST)
        return _fused_kernel(call)(x, wd, wp, b)

    return fast_primal(fused, unfused), unfused


def separable_conv(
    x: jax.Array,
    dw_kernel: jax.Array,
    pw_kernel: jax.Array,
    dw_bias: jax.Array | None = None,
    pw_bias: jax.Array | None = None,
    *,
    strides: Sequence[int],
    padding: Pairs,
    dilation: Sequence[int],
    impl: str = "auto",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """``pointwise_conv(depthwise_conv(x, dw_kernel) + dw_bias, pw_kernel, pw_bias)``.

    Args:
      x: ``(N, *spatial, C)``, zero padding ``padding`` applied here.
      dw_kernel: ``(*kernel_size, 1, C * M)``, as :func:`jaxdsc.ops.depthwise_conv`.
      pw_kernel: ``(C * M, C_out)``.
      dw_bias, pw_bias: ``(C * M,)`` and ``(C_out,)``, or None.
      impl: ``"auto"``, a depthwise implementation name (:data:`jaxdsc.ops.IMPLS`) or a
        key of :data:`jaxdsc.ops.IMPL_TABLE`; mapped to both halves by that table
        (``"shift"``: shifted-slice depthwise, XLA pointwise).
    Returns:
      ``(N, *out_spatial, C_out)`` in ``x.dtype``.
    """
    call = make_call(x, dw_kernel, strides=strides, padding=padding, dilation=dilation)
    mid = call.channels * call.depth_multiplier
    if pw_kernel.ndim != 2 or pw_kernel.shape[0] != mid:
        raise ValueError(f"pw_kernel must be ({mid}, C_out) for {mid} depthwise outputs, got {pw_kernel.shape}")
    for name, b, n in (("dw_bias", dw_bias, mid), ("pw_bias", pw_bias, pw_kernel.shape[1])):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {b.shape}")
    biases = (dw_bias, pw_bias)
    f, unfused = _fused_op(call, impl, dw_bias is not None, pw_bias is not None, precision)
    present = tuple(b for b in biases if b is not None)
    args = (x, dw_kernel, pw_kernel, *present)
    if not fused_supports(call, impl, pw_kernel, biases):
        return unfused(*args)
    if "auto" not in _resolved(impl):  # both halves explicitly native: a CPU-only program
        return f(*args)
    return lax.platform_dependent(*args, cpu=f, default=unfused)
