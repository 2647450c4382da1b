"""Dense (``groups=1``) convolution, NHWC / channels-last, any spatial rank.

Implementations (the same function; ``tests/test_ops_dense.py`` checks values
and gradients of both against each other and against float64):

* ``"xla"``: ``lax.conv_general_dilated``. The reference, and the ``"auto"``
  choice on GPU/TPU and on CPU for inputs with at least :data:`PATCHES_MAX_IN`
  + 1 channels.
* ``"patches"``: im2col: the ``prod(kernel_size)`` shifted (strided, dilated)
  slices of the padded input concatenated on the channel axis, then one
  :func:`jaxdsc.ops.pointwise.pointwise_conv` GEMM with the kernel reshaped
  to ``(prod(kernel_size) * C_in, C_out)`` (the native GEMM on CPU). XLA:CPU
  runs a conv with very few input channels far below its GEMM speed: the
  CIFAR stem, 3 -> 32 channels, 3x3, N=128 32x32, takes 8.0 ms forward and
  18.7 ms for the weight gradient with ``"xla"``, 2.1 and 5.1 ms with
  ``"patches"`` (issue 5, BENCHMARKS.md). From 8 input channels on, ``"xla"``
  measured faster (the patches are ``prod(kernel_size)`` times the input).

``"auto"`` is resolved per platform inside the program (:mod:`jaxdsc.ops._select`):
``"patches"`` only in the CPU branch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxdsc.ops._select import on_platforms, platform_of_default_backend, with_policy
from jaxdsc.ops.pointwise import pointwise_conv

DENSE_IMPLS = ("xla", "patches")

# "auto" uses "patches" on CPU up to this many input channels (measured: 1 and
# 3 channels 2-4x faster forward and weight gradient; 8 and 16 slower).
PATCHES_MAX_IN = 7


def select_dense_impl(x: jax.Array, impl: str = "auto", *, platform: str | None = None) -> str:
    """Name of the implementation ``impl`` resolves to for input ``x`` ``(N, *spatial, C_in)``.

    ``platform``: ``"cpu"`` or ``"default"`` (other platforms); None: that of
    ``jax.default_backend()``. The active :func:`jaxdsc.ops.impl_policy` applies.
    """
    impl = with_policy("dense", impl)
    if impl in DENSE_IMPLS:
        return impl
    if impl != "auto":
        raise ValueError(f"impl must be 'auto' or one of {DENSE_IMPLS}, got {impl!r}")
    platform = platform or platform_of_default_backend()
    return "patches" if platform == "cpu" and x.shape[-1] <= PATCHES_MAX_IN else "xla"


def _patches(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
             padding: Sequence[tuple[int, int]], dilation: Sequence[int], precision) -> jax.Array:
    rank = len(strides)
    ksize = kernel.shape[:rank]
    zero = jnp.zeros((), x.dtype)
    # lax.pad also takes negative (cropping) pairs, as lax.conv does.
    xp = lax.pad(x, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])
    out = [
        (xp.shape[1 + i] - dilation[i] * (ksize[i] - 1) - 1) // strides[i] + 1 for i in range(rank)
    ]
    if any(o < 1 for o in out):
        raise ValueError(
            f"the padded input {xp.shape[1:-1]} is smaller than the dilated kernel "
            f"{tuple(dilation[i] * (ksize[i] - 1) + 1 for i in range(rank))}"
        )
    n, c = x.shape[0], x.shape[-1]
    cols = []
    for tap in itertools.product(*(range(k) for k in ksize)):  # row-major, as kernel.reshape
        start = (0, *(t * d for t, d in zip(tap, dilation, strict=True)), 0)
        limit = (n, *(s + (o - 1) * st + 1 for s, o, st in zip(start[1:-1], out, strides, strict=True)), c)
        cols.append(lax.slice(xp, start, limit, (1, *strides, 1)))
    p = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return pointwise_conv(p, kernel.reshape(math.prod(ksize) * c, kernel.shape[-1]), precision=precision)


def dense_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    precision: lax.PrecisionLike = None,
    impl: str = "auto",
) -> jax.Array:
    """``lax.conv_general_dilated`` with channels-last operands.

    Args:
      x: ``(N, *spatial, C_in)``.
      kernel: ``(*kernel_size, C_in, C_out)``.
      strides, dilation: one entry per spatial axis (``rhs_dilation``).
      padding: explicit ``(low, high)`` pairs per spatial axis.
      impl: ``"auto"``, ``"xla"`` or ``"patches"`` (see the module docstring).
    Returns:
      ``(N, *out_spatial, C_out)`` in ``x.dtype``; bfloat16/float16 inputs accumulate in float32.
    """
    rank = x.ndim - 2
    if not 1 <= rank <= 3:
        raise ValueError(f"x must have rank 3, 4 or 5 (N, *spatial, C), got shape {x.shape}")
    if kernel.ndim != rank + 2 or kernel.shape[-2] != x.shape[-1]:
        raise ValueError(
            f"kernel must be (*kernel_size, C_in, C_out) with {rank} spatial axes and "
            f"C_in = x.shape[-1]; got x {x.shape}, kernel {kernel.shape}"
        )
    if not len(strides) == len(padding) == len(dilation) == rank:
        raise ValueError(
            f"strides, padding and dilation need {rank} entries each, got {strides}, {padding}, {dilation}"
        )
    spatial = "DHW"[3 - rank:]
    low = x.dtype in (jnp.bfloat16, jnp.float16)

    def xla(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, window_strides=tuple(strides), padding=tuple(padding),
            rhs_dilation=tuple(dilation),
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            precision=precision, preferred_element_type=jnp.float32 if low else None,
        ).astype(x.dtype)

    fns = {"xla": xla, "patches": lambda x, k: _patches(x, k, strides, padding, dilation, precision)}
    if with_policy("dense", impl) != "auto":
        return fns[select_dense_impl(x, impl)](x, kernel)
    return on_platforms((x, kernel), lambda p: select_dense_impl(x, platform=p), lambda n, _: fns[n])
