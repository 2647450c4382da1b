"""Dense (``groups=1``) convolution, NHWC / channels-last, any spatial rank.

Implementations (the same function; ``tests/test_ops_dense.py`` checks values
and gradients of each against the others and against float64):

* ``"xla"``: ``lax.conv_general_dilated``. The reference, and the ``"auto"``
  choice on GPU/TPU, and on CPU where ``"native"`` cannot run.
* ``"native"``: the native GEMM over the conv's implicit im2col matrix (rows
  gathered a chunk at a time into cache, never materialised), its weight
  gradient the same way, its input gradient the transposed conv
  (:mod:`jaxdsc.ops.native_dense`). float32 and bfloat16. The ``"auto"``
  choice on CPU for kernels larger than 1x1: measured faster than ``"xla"``
  on every shape tried (see :data:`NATIVE_MEASURED`).
* ``"patches"``: im2col in memory: the ``prod(kernel_size)`` shifted (strided,
  dilated) slices of the padded input concatenated on the channel axis, then
  one :func:`jaxdsc.ops.pointwise.pointwise_conv` GEMM with the kernel reshaped
  to ``(prod(kernel_size) * C_in, C_out)``. Before ``"native"`` the CPU
  choice for inputs of at most :data:`PATCHES_MAX_IN` channels (the CIFAR stem,
  3 -> 32, 3x3, N=128 32x32: 2.1 / 5.1 ms forward / weight gradient against
  8.0 / 18.7 ms with ``"xla"``, issue 5); now the CPU choice for 1x1 kernels
  (no im2col then: a strided slice at most) and the fallback for dtypes the
  native kernels lack (float16, float64), where it still beats ``"xla"``.

``"auto"`` is resolved per platform inside the program (:mod:`jaxdsc.ops._select`):
``"native"`` or ``"patches"`` only in the CPU branch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxdsc.ops import native_dense
from jaxdsc.ops._select import on_platforms, platform_of_default_backend, with_policy
from jaxdsc.ops.pointwise import pointwise_conv

DENSE_IMPLS = ("xla", "patches", "native")

# Without the native kernels (or for float16/float64), "auto" uses "patches"
# on CPU up to this many input channels (measured: 1 and 3 channels 2-4x
# faster forward and weight gradient; 8 and 16 slower).
PATCHES_MAX_IN = 7

# Why "auto" on CPU is "native" for every float32/bfloat16 dense conv: it was
# measured faster than "xla" on every training step tried, and on every forward
# but a few within the machine's noise (benchmarks/dense_ab.py, 2026-12-06
# 16:43, Intel Xeon 2 vCPUs, load 3.0-3.9 from another job, interleaved; native
# / xla time, the step = value + input gradient + weight gradient, without the
# input gradient for the first stem conv, which reads the data):
NATIVE_MEASURED = """
shape (batch 8)                                 forward  step
xception stem 3x3 s2, 3 -> 32, 224x224           0.23    0.70
xception stem 3x3, 32 -> 64, 112x112             0.94    0.46
1x1 s2 shortcut, 64 -> 128, 112x112              0.64    0.28
3x3, 256 -> 256, 28x28                           1.08    0.41
TCN causal k3, C 64, T 1000, dilation 1/16/256   0.79 / 1.11 / 0.89   0.53 / 0.89 / 0.78
TCN causal k3, C 64, T 4096, dilation 1/16/256   0.90 / 1.21 / 1.15   0.63 / 0.80 / 0.48
"""
# The forwards above 1.0 (the K = 192-2304 GEMMs) measured 0.91-0.97 in a rerun
# of three of them (stem 32 -> 64, TCN T 4096 d 16, 256 -> 256) at load 3.3.
# Against "patches", the CPU choice for <= 7 channels before: DSCNet's CIFAR stem
# (3x3, 3 -> 32, N 128 32x32, no input gradient) 0.55 forward, 0.70 step (17:40, load 8).
# 1x1 kernels take "patches" instead (for them a strided slice, or nothing, then
# the pointwise GEMM with its fused one-pass backward): the 1x1 s2 shortcut's
# step took 0.83 and 0.88 of "native"'s time in two runs (loads 3.9 and 11),
# its forward 1.32 and 1.06; "native" gathers rows the GEMM could read in place.


def select_dense_impl(x: jax.Array, impl: str = "auto", *, platform: str | None = None,
                      kernel_size: Sequence[int] | None = None) -> str:
    """Name of the implementation ``impl`` resolves to for input ``x`` ``(N, *spatial, C_in)``.

    ``platform``: ``"cpu"`` or ``"default"`` (other platforms); None: that of
    ``jax.default_backend()``. ``kernel_size``: the spatial kernel size, if
    known (1x1 kernels take ``"patches"`` on CPU, see :data:`NATIVE_MEASURED`).
    The active :func:`jaxdsc.ops.impl_policy` applies.
    """
    impl = with_policy("dense", impl)
    if impl in DENSE_IMPLS:
        return impl
    if impl != "auto":
        raise ValueError(f"impl must be 'auto' or one of {DENSE_IMPLS}, got {impl!r}")
    platform = platform or platform_of_default_backend()
    if platform != "cpu":
        return "xla"
    if jnp.dtype(x.dtype) in native_dense.DTYPES and 3 <= x.ndim <= 5 and native_dense.available():
        one = kernel_size is not None and all(k == 1 for k in kernel_size)
        return "patches" if one else "native"
    return "patches" if x.shape[-1] <= PATCHES_MAX_IN else "xla"


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
      impl: ``"auto"``, ``"xla"``, ``"native"`` or ``"patches"`` (see the module docstring).
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

    fns = {"xla": xla, "patches": lambda x, k: _patches(x, k, strides, padding, dilation, precision),
           "native": lambda x, k: native_dense.dense_native(x, k, strides, padding, dilation)}
    ks = kernel.shape[:rank]
    if with_policy("dense", impl) != "auto":
        return fns[select_dense_impl(x, impl, kernel_size=ks)](x, kernel)
    return on_platforms((x, kernel), lambda p: select_dense_impl(x, platform=p, kernel_size=ks),
                        lambda n, _: fns[n])
