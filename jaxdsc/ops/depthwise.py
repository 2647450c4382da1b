"""Depthwise (grouped, ``groups == channels``) dilated convolution.

``depthwise_conv`` is the one entry point. It dispatches to an implementation
by name; every implementation computes the same function as the reference
``"xla"`` path, a single ``lax.conv_general_dilated`` with
``feature_group_count=C`` and ``rhs_dilation``. ``impl="auto"`` picks the
fastest registered implementation that supports the backend and the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

Pairs = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class DepthwiseCall:
    """Static description of one depthwise call, what an implementation may decline."""

    rank: int
    channels: int
    depth_multiplier: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dtype: jnp.dtype
    backend: str


@dataclass(frozen=True)
class Impl:
    """A registered implementation.

    ``fn(x, kernel, call, precision)`` computes the conv; ``supports(call)``
    says whether it can; ``priority`` orders candidates for ``"auto"`` (higher
    first) on the backends listed in ``auto_backends``.
    """

    fn: Callable[..., jax.Array]
    supports: Callable[[DepthwiseCall], bool]
    priority: int = 0
    auto_backends: tuple[str, ...] = ()


IMPLS: dict[str, Impl] = {}


def register_impl(name: str, impl: Impl) -> None:
    """Add (or replace) an implementation selectable by ``impl=name``."""
    IMPLS[name] = impl


def _xla(x: jax.Array, kernel: jax.Array, call: DepthwiseCall, precision) -> jax.Array:
    rank = call.rank
    spatial = "DHW"[3 - rank :]
    dn = lax.conv_dimension_numbers(
        x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    )
    low = x.dtype in (jnp.bfloat16, jnp.float16)
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=call.strides,
        padding=call.padding,
        rhs_dilation=call.dilation,
        dimension_numbers=dn,
        feature_group_count=call.channels,
        precision=precision,
        preferred_element_type=jnp.float32 if low else None,
    )
    return y.astype(x.dtype)


register_impl("xla", Impl(fn=_xla, supports=lambda call: True, priority=0))


def select_impl(call: DepthwiseCall, impl: str) -> str:
    """Name of the implementation ``impl`` resolves to for ``call``."""
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"impl must be 'auto' or one of {sorted(IMPLS)}, got {impl!r}")
        if not IMPLS[impl].supports(call):
            raise ValueError(f"impl={impl!r} does not support this call: {call}")
        return impl
    ranked = sorted(
        (i for i in IMPLS.items() if call.backend in i[1].auto_backends and i[1].supports(call)),
        key=lambda item: -item[1].priority,
    )
    return ranked[0][0] if ranked else "xla"


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int],
    padding: Pairs,
    dilation: Sequence[int],
    impl: str = "auto",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Depthwise conv of channels-last ``x`` with zero padding ``padding``.

    Args:
      x: ``(N, *spatial, C)``.
      kernel: ``(*kernel_size, 1, C * M)``; output channel ``o`` reads input
        channel ``o // M`` (PyTorch ``groups=C`` order).
      strides, dilation: one int per spatial dim.
      padding: explicit non-negative ``(lo, hi)`` zero padding per spatial dim.
      impl: ``"auto"`` or a name in :data:`IMPLS`.
    Returns:
      ``(N, *out_spatial, C * M)`` in ``x.dtype`` (float32 accumulation for
      bfloat16/float16 inputs).
    """
    rank = x.ndim - 2
    channels = x.shape[-1]
    call = DepthwiseCall(
        rank=rank,
        channels=channels,
        depth_multiplier=kernel.shape[-1] // channels,
        kernel_size=tuple(kernel.shape[:rank]),
        strides=tuple(strides),
        dilation=tuple(dilation),
        padding=tuple(tuple(p) for p in padding),
        dtype=x.dtype,
        backend=jax.default_backend(),
    )
    name = select_impl(call, impl)
    return IMPLS[name].fn(x, kernel, call, precision)
