"""Depthwise then pointwise conv, with the forward fused into one native kernel on CPU.

``separable_conv`` computes ``pointwise(depthwise(x) + dw_bias) + pw_bias``.
When both halves would run natively (CPU, float32, ``impl`` resolving to
``"native"``, enough rows for the native GEMM) the forward is the fused
``jaxdsc_sep_forward`` kernel: each task computes a group of depthwise output
rows into an L2-resident buffer and runs the pointwise GEMM on it, so the
intermediate never makes the round trip through memory. The depthwise bias is
folded into the pointwise one (``pw_bias + dw_bias @ pw_kernel``).

Derivatives (``jax.grad``, ``jax.jvp``, any order) run the unfused pair, whose
forward keeps the intermediate for the pointwise weight gradient: the fused
kernel serves inference. ``tests/test_ops_separable.py`` checks the fused forward and
the gradients against the unfused composition and the ``"xla"`` path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxdsc.ops import native
from jaxdsc.ops._linear import fast_primal
from jaxdsc.ops.depthwise import DepthwiseCall, Pairs, depthwise_conv, make_call, select_impl
from jaxdsc.ops.pointwise import pointwise_conv, select_pointwise_impl

SEP_TARGET = "jaxdsc_sep_forward"

# Module switch for benchmarks and tests: False always runs the unfused pair.
FUSED_FORWARD = True


def _register() -> bool:
    lib = native._LIB  # the library native.py loaded and self-checked
    if lib is None or not native.pointwise_available():
        return False
    try:
        jax.ffi.register_ffi_target(SEP_TARGET, jax.ffi.pycapsule(getattr(lib, SEP_TARGET)), platform="cpu")
    except (AttributeError, RuntimeError, ValueError):  # a library built before the fused kernel
        return False
    return True


_AVAILABLE = _register()


def fused_available() -> bool:
    """True when the native library has the fused separable forward."""
    return _AVAILABLE and native.available()


def fused_supports(call: DepthwiseCall, impl: str, pw_kernel: jax.Array,
                   biases: Sequence[jax.Array | None]) -> bool:
    """Whether :func:`separable_conv` runs the fused forward for these operands."""
    f32 = jnp.dtype(jnp.float32)
    if not (FUSED_FORWARD and fused_available() and call.dtype == f32
            and jnp.dtype(pw_kernel.dtype) == f32
            and all(b is None or jnp.dtype(b.dtype) == f32 for b in biases)):
        return False
    if select_impl(call, impl) != "native":
        return False
    h = jax.ShapeDtypeStruct((call.batch, *call.out_spatial, pw_kernel.shape[0]), f32)
    return select_pointwise_impl(h, pw_kernel, biases[1]) == "native"


def _fused_ffi(x, wd, wp, b, call: DepthwiseCall):
    y_shape = (x.shape[0], *call.out_spatial, wp.shape[1])
    out = jax.ShapeDtypeStruct(native._as5d(y_shape), x.dtype)
    y = jax.ffi.ffi_call(SEP_TARGET, out, vmap_method="sequential")(
        x.reshape(native._as5d(x.shape)), native._kernel4d(wd, call), wp, b, **native._attrs(call)
    )
    return y.reshape(y_shape)


@functools.lru_cache(maxsize=512)
def _fused_op(call: DepthwiseCall, impl: str, has_dw_bias: bool, has_pw_bias: bool, precision):
    """``f(x, wd, wp, *biases)``: fused primal, unfused derivatives, for one static geometry."""

    def unpack(biases):
        it = iter(biases)
        return (next(it) if has_dw_bias else None), (next(it) if has_pw_bias else None)

    def unfused(x, wd, wp, *biases):
        bd, bp = unpack(biases)
        h = depthwise_conv(x, wd, strides=call.strides, padding=call.padding, dilation=call.dilation,
                           impl=impl, precision=precision)
        if bd is not None:
            h = h + bd
        return pointwise_conv(h, wp, bp, precision=precision)

    def fused(x, wd, wp, *biases):
        bd, bp = unpack(biases)
        b = jnp.zeros((wp.shape[1],), wp.dtype) if bp is None else bp
        if bd is not None:
            b = b + jnp.dot(bd, wp, precision=lax.Precision.HIGHEST)
        return _fused_ffi(x, wd, wp, b, call)

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
      impl: the depthwise implementation (``"auto"`` or a name in :data:`jaxdsc.ops.IMPLS`).
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
    if fused_supports(call, impl, pw_kernel, biases):
        return f(x, dw_kernel, pw_kernel, *present)
    return unfused(x, dw_kernel, pw_kernel, *present)
