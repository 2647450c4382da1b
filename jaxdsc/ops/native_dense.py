"""Native dense (``groups=1``) conv for CPU through ``jax.ffi`` (``impl="native"`` of the dense op).

The kernels (``csrc/dense_ffi.inc``) are the pointwise GEMM of
:mod:`jaxdsc.ops.native_pointwise` run over the conv's implicit im2col
matrix: each chunk of output pixels gathers its receptive fields (taps x
``C_in``, zeros in the padding) into an L1/L2-resident staging buffer that the
GEMM tiles read, so nothing ``prod(kernel_size)`` times the input is ever
written to memory (what the ``"patches"`` path does).

* forward: ``jaxdsc_dc_forward(x, w)``;
* weight gradient: ``jaxdsc_dc_grad_kernel(x, g)``, the same gathered rows
  against ``g`` (per-task partials summed in a fixed order: deterministic);
* input gradient at stride 1: the forward of ``g`` with the kernel flipped
  and its channel axes swapped, padded by ``d * (k - 1) - lo`` (the
  transposed conv of a stride-1 conv is a stride-1 conv); for a strided 1x1
  kernel (xception's shortcuts) ``g w^T`` spread over every s-th pixel; for
  other strided kernels XLA's transposed convolution (a native one would need
  zero-interleaved ``g``: ``prod(strides)`` times the work). The strided
  k > 1 convs measured here are stems reading the data, whose input gradient
  is never taken.

Any rank 1-3, stride, dilation and (negative) padding; float32, or bfloat16
with float32 accumulation. Gradients of any order and mode come from
:mod:`jaxdsc.ops._vjp`; batch-sharded ``jit`` runs per shard
(:mod:`jaxdsc.ops._partition`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdsc.ops import native
from jaxdsc.ops._partition import BATCH, SUM, batch_op
from jaxdsc.ops._vjp import Family, make_family

FAMILY = "dense"
TARGETS = ("jaxdsc_dc_forward", "jaxdsc_dc_grad_kernel")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # the kernels' dtypes


def available() -> bool:
    """True when the native dense-conv kernels are built, loaded and self-checked."""
    return native.available(FAMILY)


class DenseCall(NamedTuple):
    """The static geometry of one call (hashable: a cache key)."""

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    spatial: tuple[int, ...]  # input
    out_spatial: tuple[int, ...]
    c_in: int
    c_out: int


def make_call(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
              padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> DenseCall:
    """The :class:`DenseCall` of ``x`` ``(N, *spatial, C_in)`` and kernel ``(*k, C_in, C_out)``."""
    rank = len(x_shape) - 2
    ks = tuple(int(k) for k in kernel_shape[:rank])
    out = tuple(
        (x_shape[1 + i] + lo + hi - dilation[i] * (ks[i] - 1) - 1) // strides[i] + 1
        for i, (lo, hi) in enumerate(padding)
    )
    return DenseCall(ks, tuple(map(int, strides)), tuple((int(lo), int(hi)) for lo, hi in padding),
                     tuple(map(int, dilation)), tuple(x_shape[1:-1]), out, int(x_shape[-1]),
                     int(kernel_shape[-1]))


def _pad3(values: Sequence[int], fill: int) -> tuple[int, ...]:
    return (fill,) * (3 - len(values)) + tuple(values)


def _as5d(a: jax.Array) -> jax.Array:
    """(N, *spatial, C) -> (N, D, H, W, C) with unit dims in front of the spatial ones."""
    return a.reshape(a.shape[0], *_pad3(a.shape[1:-1], 1), a.shape[-1])


def _ffi(target: str, shape: tuple[int, ...], dtype, a: jax.Array, b: jax.Array, strides, dilation,
         pad_lo) -> jax.Array:
    out = jax.ShapeDtypeStruct(shape, dtype)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        a, b, strides=np.asarray(_pad3(strides, 1), np.int64),
        dilation=np.asarray(_pad3(dilation, 1), np.int64), pad_lo=np.asarray(_pad3(pad_lo, 0), np.int64),
    )


def _conv(x: jax.Array, w: jax.Array, strides, dilation, pad_lo, out_spatial) -> jax.Array:
    """The FFI forward: ``w`` ``(*k, C_in, C_out)``; the high padding is implied by ``out_spatial``."""
    rank = x.ndim - 2
    y_shape = (x.shape[0], *out_spatial, w.shape[-1])
    w5 = w.reshape(*_pad3(w.shape[:rank], 1), *w.shape[-2:])
    y = _ffi("jaxdsc_dc_forward", (x.shape[0], *_pad3(out_spatial, 1), w.shape[-1]), x.dtype,
             _as5d(x), w5, strides, dilation, pad_lo)
    return y.reshape(y_shape)


def _forward(x: jax.Array, w: jax.Array, call: DenseCall) -> jax.Array:
    return _conv(x, w, call.strides, call.dilation, [lo for lo, _ in call.padding], call.out_spatial)


def _grad_input(g: jax.Array, w: jax.Array, call: DenseCall) -> jax.Array:
    rank = len(call.strides)
    if max(call.strides) == 1:
        # dx[i] = sum_t g[i + lo - t d] w[t]^T: a stride-1 conv of g with the
        # flipped kernel, C_out -> C_in, low padding d (k - 1) - lo.
        wt = jnp.swapaxes(jnp.flip(w, axis=tuple(range(rank))), -1, -2)
        pad_lo = [d * (k - 1) - lo for d, k, (lo, _) in zip(call.dilation, call.kernel_size, call.padding,
                                                            strict=True)]
        return _conv(g, wt, (1,) * rank, call.dilation, pad_lo, call.spatial)
    if max(call.kernel_size) == 1:
        # A strided 1x1 conv reads every s-th pixel: dx is g w^T (one GEMM) at those pixels,
        # zeros between (lax.pad's interior padding), cropped / padded to the input's extent.
        gw = _conv(g, jnp.swapaxes(w, -1, -2), (1,) * rank, (1,) * rank, (0,) * rank, call.out_spatial)
        edges = [(-lo, n + lo - (o - 1) * s - 1, s - 1) for n, o, s, (lo, _) in
                 zip(call.spatial, call.out_spatial, call.strides, call.padding, strict=True)]
        return lax.pad(gw, jnp.zeros((), gw.dtype), [(0, 0, 0), *edges, (0, 0, 0)])
    x_aval = jax.ShapeDtypeStruct((g.shape[0], *call.spatial, call.c_in), g.dtype)
    (dx,) = jax.linear_transpose(lambda x: _xla(x, w, call), x_aval)(g)
    return dx


def _grad_kernel(x: jax.Array, g: jax.Array, call: DenseCall) -> jax.Array:
    k5 = (*_pad3(call.kernel_size, 1), call.c_in, call.c_out)
    dw = _ffi("jaxdsc_dc_grad_kernel", k5, x.dtype, _as5d(x), _as5d(g), call.strides, call.dilation,
              [lo for lo, _ in call.padding])
    return dw.reshape(*call.kernel_size, call.c_in, call.c_out)


def _xla(x: jax.Array, w: jax.Array, call: DenseCall) -> jax.Array:
    """The reference conv of ``call`` (float32 accumulation for bfloat16, as the kernels)."""
    spatial = "DHW"[3 - len(call.strides):]
    low = x.dtype == jnp.bfloat16
    return lax.conv_general_dilated(
        x, w, call.strides, call.padding, rhs_dilation=call.dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        preferred_element_type=jnp.float32 if low else None,
    ).astype(x.dtype)


@functools.lru_cache(maxsize=512)
def family(call: DenseCall) -> Family:
    """Differentiable (any order) native ops for one static geometry, each with its per-shard form."""
    return make_family(
        batch_op(lambda x, w: _forward(x, w, call), batched=(True, False), outputs=(BATCH,)),
        batch_op(lambda g, w: _grad_input(g, w, call), batched=(True, False), outputs=(BATCH,)),
        batch_op(lambda x, g: _grad_kernel(x, g, call), batched=(True, True), outputs=(SUM,)),
    )


def supports(x: jax.Array, kernel: jax.Array) -> bool:
    """float32/bfloat16 operands of one dtype, rank 1-3, and the kernels available."""
    dtype = jnp.dtype(x.dtype)
    return dtype in DTYPES and jnp.dtype(kernel.dtype) == dtype and 3 <= x.ndim <= 5 and available()


def dense_native(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                 padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> jax.Array:
    """``impl="native"``: NHWC ``x`` ``(N, *spatial, C_in)``, kernel ``(*k, C_in, C_out)``."""
    if not supports(x, kernel):
        raise ValueError(
            f"impl='native' (dense conv) needs float32 or bfloat16 x and kernel of one dtype, rank 1-3, "
            f"and the native kernels; got x {x.dtype} {x.shape}, kernel {kernel.dtype}"
            + (f"; kernels unavailable: {native.unavailable_reason(FAMILY)}" if not available() else "")
        )
    call = make_call(x.shape, kernel.shape, strides, padding, dilation)
    if min(call.out_spatial) < 1:
        raise ValueError(f"the padded input {x.shape[1:-1]} (padding {tuple(padding)}) is smaller than "
                         f"the dilated kernel {call.kernel_size} (dilation {call.dilation})")
    return family(call).conv(x, kernel)


# ------------------------------------------------------------ self-check --


def self_check() -> str:
    """Both targets and both input-gradient forms on small odd cases against XLA; "" if they agree.

    Guards against a library built for another XLA FFI ABI or a broken
    compiler: better the XLA path than wrong numbers.
    """
    rng = np.random.default_rng(2)
    for shape, ks, strides, dilation, padding in (
        ((2, 7, 6, 3), (3, 2), (2, 1), (1, 2), ((1, 0), (2, 1))),
        ((2, 9, 5), (3,), (1,), (2,), ((4, 0),)),
    ):
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.standard_normal((*ks, shape[-1], 5)).astype(np.float32)
        call = make_call(shape, w.shape, strides, padding, dilation)
        g = rng.standard_normal((shape[0], *call.out_spatial, 5)).astype(np.float32)
        y_ref, vjp = jax.vjp(lambda x, w, call=call: _xla(x, w, call), x, w)
        dx_ref, dw_ref = vjp(g)
        for name, got, ref in (
            ("forward", jax.jit(_forward, static_argnums=2)(x, w, call), y_ref),
            ("grad_input", jax.jit(_grad_input, static_argnums=2)(g, w, call), dx_ref),
            ("grad_kernel", jax.jit(_grad_kernel, static_argnums=2)(x, g, call), dw_ref),
        ):
            got, ref = np.asarray(got), np.asarray(ref)
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-4, atol=1e-4):
                return f"{name} disagrees with XLA's convolution ({shape}, kernel {ks})"
    return ""


native.register_family(FAMILY, TARGETS, self_check)
