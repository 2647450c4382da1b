"""Pointwise (1x1) convolution as a matmul over the channel axis.

Implementations (all compute the same function; ``tests/test_ops_pointwise.py``
checks values and gradients of each against a float64 reference):

* ``"xla"``: one ``dot_general`` on the ``(N * spatial, C_in)`` view. On
  XLA:CPU it is 1.4-2.6x faster than a 1x1 ``lax.conv`` (shared/perf-probe
  REPORT.md section 4); on GPU/TPU it is the vendor GEMM. The ``"auto"``
  choice everywhere except where ``"native"`` is.
* ``"native"``: the C++ GEMM of :mod:`jaxdsc.ops.native_pointwise` (CPU, float32 or
  bfloat16 with float32 accumulation; bias fused into the forward, the bias
  gradient into the weight gradient). ``"auto"`` picks it on CPU for inputs
  with at least :data:`NATIVE_MIN_ROWS` rows, where it measured faster than
  XLA's GEMM (BENCHMARKS.md, "Layers (`nopf2`)"), in the CPU
  branch of the program only (:mod:`jaxdsc.ops._select`); under a
  batch-sharded ``jit`` each device multiplies its own rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxdsc.ops import native_pointwise
from jaxdsc.ops._select import native_or_xla, on_platforms, platform_of_default_backend, with_policy

PW_IMPLS = ("xla", "native")

# "auto" uses the native GEMM from this many rows (N * spatial) on: below it
# the per-call cost (packing the weight, thread hand-off) is not amortised.
NATIVE_MIN_ROWS = 4096


def _xla(x, kernel, bias, precision):
    acc = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else None
    # A 2-D matmul on the (N * spatial, C_in) view (a free reshape): its
    # autodiff weight gradient is one plain GEMM, where the N-D dot_general's
    # contracts three axes; 1.4x faster forward+backward on XLA:CPU at
    # N=128, 32x32, 128->128 (issue 5).
    x2 = x.reshape(-1, x.shape[-1])
    y = lax.dot_general(
        x2, kernel, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=acc
    ).reshape(*x.shape[:-1], kernel.shape[-1])
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(x.dtype)


def select_pointwise_impl(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, impl: str = "auto", *,
    platform: str | None = None,
) -> str:
    """Name of the implementation ``impl`` resolves to for these operands.

    ``platform``: ``"cpu"`` or ``"default"`` (other platforms); None: that of
    ``jax.default_backend()``. The active :func:`jaxdsc.ops.impl_policy` applies.
    """
    return native_or_xla(
        with_policy("pointwise", impl),
        PW_IMPLS,
        supported=lambda: native_pointwise.pointwise_supports(x, kernel, bias),
        large=math.prod(x.shape[:-1]) >= NATIVE_MIN_ROWS,
        requirement=lambda: (
            "impl='native' needs the native library "
            "(jaxdsc.ops.native.available('pointwise')) and float32 or bfloat16 "
            f"operands of one dtype; got x {x.dtype}, kernel {kernel.dtype}"
            + ("" if bias is None else f", bias {bias.dtype}") + " (CPU only)"
        ),
        platform=platform or platform_of_default_backend(),
    )


def pointwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    precision: lax.PrecisionLike = None,
    impl: str = "auto",
) -> jax.Array:
    """``y[..., o] = sum_i x[..., i] * kernel[i, o] + bias[o]``.

    Args:
      x: ``(N, *spatial, C_in)``.
      kernel: ``(C_in, C_out)``.
      bias: ``(C_out,)`` or None.
      precision: passed to the ``"xla"`` path; the native path always
        multiplies in float32 (the most precise setting).
      impl: ``"auto"``, ``"xla"`` or ``"native"`` (see the module docstring).
    Returns:
      ``(N, *spatial, C_out)`` in ``x.dtype``; low-precision inputs accumulate in float32.
    """
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"kernel must be (C_in, C_out) with C_in = x.shape[-1]; got x {x.shape}, "
            f"kernel {kernel.shape}"
        )
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise ValueError(f"bias must have shape ({kernel.shape[1]},), got {bias.shape}")
    fns = {
        "xla": lambda x, kernel, bias: _xla(x, kernel, bias, precision),
        "native": lambda x, kernel, bias: native_pointwise.pointwise_conv(x, kernel, bias, precision=precision),
    }
    if with_policy("pointwise", impl) != "auto":
        return fns[select_pointwise_impl(x, kernel, bias, impl)](x, kernel, bias)
    cpu, other = (select_pointwise_impl(x, kernel, bias, platform=p) for p in ("cpu", "default"))
    if (cpu, other) == ("native", "xla"):
        return native_pointwise.pointwise_conv(x, kernel, bias, portable=True, precision=precision)
    return on_platforms(
        (x, kernel, bias),
        lambda p: select_pointwise_impl(x, kernel, bias, platform=p),
        lambda name, _: fns[name],
    )
