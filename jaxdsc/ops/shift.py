"""Pure-JAX depthwise conv as a sum of shifted, strided slices (``impl="shift"``).

``y = sum_t slice_t(pad(x)) * w[t]`` over the ``prod(kernel_size)`` taps
``t``: XLA:CPU fuses it into one pad plus one elementwise loop, 20-100x faster
than its grouped convolution (shared/perf-probe REPORT.md section 3). The
gradients are hand-written (:mod:`jaxdsc.ops._vjp`):

* input gradient: the same shifted-slice sum over the cotangent, interior-
  padded by ``stride - 1`` and edge-padded so the flipped kernel lands on ``x``;
* weight gradient: per-tap reductions ``sum(slice_t(pad(x)) * g)``, run over
  cache-sized batch chunks with ``lax.scan``. Unchunked, XLA:CPU materialises
  every padded slice in DRAM before reducing it (5x slower).

Works on any backend, for rank 1-3, any stride/dilation/padding/depth
multiplier and any float dtype; low-precision inputs accumulate in float32.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from jaxdsc.ops._vjp import Family, make_family
from jaxdsc.ops.depthwise import DepthwiseCall, Impl, register_impl

# Elements of x per weight-gradient chunk: 2**18 float32 = 1 MiB, so a chunk of
# x, g and one padded slice sit in the 1 MiB L2 together with headroom.
_CHUNK_ELEMENTS = 1 << 18


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _taps(call: DepthwiseCall) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(k) for k in call.kernel_size)))


def _expand(x: jax.Array, multiplier: int) -> jax.Array:
    """Repeat each channel ``multiplier`` times: output channel ``o`` reads ``o // M``."""
    return x if multiplier == 1 else jnp.repeat(x, multiplier, axis=-1)


def _window(
    xp: jax.Array, offset: tuple[int, ...], size: tuple[int, ...], strides: tuple[int, ...]
) -> jax.Array:
    """``xp[:, offset + i * strides, :]`` for ``i < size`` in every spatial dim."""
    start = (0, *offset, 0)
    limit = (
        xp.shape[0],
        *(o + (n - 1) * s + 1 for o, n, s in zip(offset, size, strides, strict=True)),
        xp.shape[-1],
    )
    return lax.slice(xp, start, limit, (1, *strides, 1))


def _padded(x: jax.Array, pads: list[tuple[int, int, int]]) -> jax.Array:
    return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])


def _forward(x: jax.Array, w: jax.Array, call: DepthwiseCall) -> jax.Array:
    acc = _acc_dtype(x.dtype)
    xp = _padded(_expand(x, call.depth_multiplier), [(lo, hi, 0) for lo, hi in call.padding])
    y = None
    for t in _taps(call):
        offset = tuple(i * d for i, d in zip(t, call.dilation, strict=True))
        term = _window(xp, offset, call.out_spatial, call.strides).astype(acc) * w[(*t, 0)].astype(
            acc
        )
        y = term if y is None else y + term
    return y.astype(x.dtype)  # type: ignore[union-attr]


def _grad_input(g: jax.Array, w: jax.Array, call: DepthwiseCall) -> jax.Array:
    acc = _acc_dtype(g.dtype)
    pads = []
    for n, (lo, hi), k, s, d in zip(
        call.spatial, call.padding, call.kernel_size, call.strides, call.dilation, strict=True
    ):
        # Rows of pad(x) the last output does not reach still need an x-sized
        # result, so the high side gets the remainder back. Negative pads crop.
        rem = (n + lo + hi - d * (k - 1) - 1) % s
        pads.append((d * (k - 1) - lo, d * (k - 1) - hi + rem, s - 1))
    gp = _padded(g, pads)
    ones = (1,) * call.rank
    dx = None
    for t in _taps(call):
        offset = tuple(i * d for i, d in zip(t, call.dilation, strict=True))
        flipped = tuple(k - 1 - i for i, k in zip(t, call.kernel_size, strict=True))
        term = _window(gp, offset, call.spatial, ones).astype(acc) * w[(*flipped, 0)].astype(acc)
        dx = term if dx is None else dx + term
    if call.depth_multiplier > 1:
        dx = dx.reshape(*dx.shape[:-1], call.channels, call.depth_multiplier).sum(-1)  # type: ignore[union-attr]
    return dx.astype(g.dtype)  # type: ignore[union-attr]


def _grad_kernel_chunk(x: jax.Array, g: jax.Array, call: DepthwiseCall) -> jax.Array:
    """``(T, C*M)`` float32 weight gradient of one batch chunk."""
    acc = _acc_dtype(x.dtype)
    xp = _padded(_expand(x, call.depth_multiplier), [(lo, hi, 0) for lo, hi in call.padding])
    g = g.astype(acc)
    axes = tuple(range(call.rank + 1))
    rows = []
    for t in _taps(call):
        offset = tuple(i * d for i, d in zip(t, call.dilation, strict=True))
        rows.append(
            jnp.sum(_window(xp, offset, call.out_spatial, call.strides).astype(acc) * g, axis=axes)
        )
    return jnp.stack(rows)


def _grad_kernel(x: jax.Array, g: jax.Array, call: DepthwiseCall) -> jax.Array:
    n = x.shape[0]
    per_image = max(1, x.size // n * call.depth_multiplier)
    chunk = max(1, min(n, _CHUNK_ELEMENTS // per_image))
    if chunk == n:
        dw = _grad_kernel_chunk(x, g, call)
    else:
        # Prefer a divisor of N; pad the batch with zero images (which add
        # nothing to the gradient) only when the best divisor is too small.
        divisor = max(b for b in range(1, chunk + 1) if n % b == 0)
        if 2 * divisor >= chunk:
            chunk = divisor
        steps = -(-n // chunk)
        extra = steps * chunk - n
        if extra:
            x = jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))
            g = jnp.pad(g, [(0, extra)] + [(0, 0)] * (g.ndim - 1))
        xs = x.reshape(steps, chunk, *x.shape[1:])
        gs = g.reshape(steps, chunk, *g.shape[1:])

        def body(total: jax.Array, xg: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            return total + _grad_kernel_chunk(xg[0], xg[1], call), None

        zero = jnp.zeros((len(_taps(call)), call.out_channels), _acc_dtype(x.dtype))
        dw, _ = lax.scan(body, zero, (xs, gs))
    return dw.reshape(*call.kernel_size, 1, call.out_channels).astype(x.dtype)


def kernels(call: DepthwiseCall) -> tuple:
    """The raw forward, input- and weight-gradient kernels for one geometry (no fused backward)."""
    return (
        lambda x, w: _forward(x, w, call),
        lambda g, w: _grad_input(g, w, call),
        lambda x, g: _grad_kernel(x, g, call),
        None,
    )


@functools.lru_cache(maxsize=512)
def family(call: DepthwiseCall) -> Family:
    """Differentiable (any order) shift-conv ops for one static geometry."""
    return make_family(*kernels(call)[:3])


def shift_conv(x: jax.Array, kernel: jax.Array, call: DepthwiseCall, precision=None) -> jax.Array:
    """``impl="shift"``: NHWC ``x`` ``(N, *spatial, C)``, kernel ``(*k, 1, C*M)``."""
    del precision  # products and sums are always formed in (at least) float32
    return family(call).conv(x, kernel)


def supports(call: DepthwiseCall) -> bool:
    """Any float dtype and geometry whose output is non-empty."""
    return jnp.issubdtype(call.dtype, jnp.floating) and min(call.out_spatial) >= 1


register_impl("shift", Impl(fn=shift_conv, supports=supports, priority=10, auto_backends=("cpu",),
                            kernels=kernels))
