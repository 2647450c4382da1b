"""Depthwise (grouped, ``groups == channels``) dilated convolution.

``depthwise_conv`` is the one entry point. It dispatches to an implementation
by name; every implementation computes the same function as the reference
``"xla"`` path, a single ``lax.conv_general_dilated`` with
``feature_group_count=C`` and ``rhs_dilation``. ``impl="auto"`` picks, per
platform inside the program (:mod:`jaxdsc.ops._select`), the fastest
registered implementation that lists the platform in its ``auto_backends``
and supports the call; the active :func:`jaxdsc.ops.impl_policy` applies first.

Registered here: ``"xla"`` (reference; the ``"auto"`` choice off CPU).
:mod:`jaxdsc.ops.shift` adds ``"shift"`` (pure JAX) and
:mod:`jaxdsc.ops.native_depthwise` adds ``"native"`` (C++ kernel through
``jax.ffi``, when its shared library is there); both are ``"auto"``
candidates on CPU, where XLA's grouped convolution is 50-110x slower than PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from jax import lax

from jaxdsc.ops._select import on_platforms, with_policy
from jaxdsc.ops._vjp import Family, make_family

Pairs = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class DepthwiseCall:
    """Static description of one depthwise call, what an implementation may decline.

    ``spatial`` is the (already padded by the caller, if at all) input size per
    spatial dim, ``batch`` the leading dim; both are static under ``jit``.
    """

    rank: int
    channels: int
    depth_multiplier: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dtype: jnp.dtype
    backend: str
    spatial: tuple[int, ...] = ()
    batch: int = 0

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """Output size per spatial dim (may be <= 0 when the window does not fit)."""
        return tuple(
            (n + lo + hi - d * (k - 1) - 1) // s + 1
            for n, (lo, hi), k, s, d in zip(
                self.spatial,
                self.padding,
                self.kernel_size,
                self.strides,
                self.dilation,
                strict=True,
            )
        )

    @property
    def out_channels(self) -> int:
        return self.channels * self.depth_multiplier


@dataclass(frozen=True)
class Impl:
    """A registered implementation.

    ``fn(x, kernel, call, precision)`` computes the conv; ``supports(call)``
    says whether it can; ``priority`` orders candidates for ``"auto"`` (higher
    first) on the backends listed in ``auto_backends``. ``kernels(call)``, if
    given, returns its raw ``(forward, grad_input, grad_kernel, grad_both or
    None)`` for one geometry (the :func:`jaxdsc.ops._vjp.make_family`
    arguments): ``"auto"`` then makes the platform choice per kernel, inside
    one differentiable family.
    """

    fn: Callable[..., jax.Array]
    supports: Callable[[DepthwiseCall], bool]
    priority: int = 0
    auto_backends: tuple[str, ...] = ()
    kernels: Callable[[DepthwiseCall], tuple] | None = None


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


def _xla_kernels(call: DepthwiseCall, precision=None) -> tuple:
    """The reference conv and its exact transposes (what autodiff of ``"xla"`` computes)."""

    def fwd(x, w):
        return _xla(x, w, call, precision)

    def grad_input(g, w):
        x = jax.ShapeDtypeStruct((g.shape[0], *call.spatial, call.channels), g.dtype)
        return jax.linear_transpose(lambda x: fwd(x, w), x)(g)[0]

    def grad_kernel(x, g):
        w = jax.ShapeDtypeStruct((*call.kernel_size, 1, call.out_channels), x.dtype)
        return jax.linear_transpose(lambda w: fwd(x, w), w)(g)[0]

    return fwd, grad_input, grad_kernel, None


register_impl("xla", Impl(fn=_xla, supports=lambda call: True, priority=0, kernels=_xla_kernels))


@functools.lru_cache(maxsize=512)
def _platform_family(cpu: str, other: str, calls: tuple[DepthwiseCall, DepthwiseCall], precision) -> Family:
    """One family whose raw kernels are ``lax.platform_dependent`` (CPU: ``cpu``, else ``other``).

    The choice sits in the raw kernels that the tangent maps and their
    transposes call (:mod:`jaxdsc.ops._linear`), so differentiation never goes
    through a cond (linearising and transposing one per layer made tracing
    several times slower).
    """
    a = IMPLS[cpu].kernels(calls[0])  # type: ignore[misc]
    b = (_xla_kernels(calls[1], precision) if other == "xla"
         else IMPLS[other].kernels(calls[1]))  # type: ignore[misc]

    def pd(f, g):
        return lambda *args: lax.platform_dependent(*args, cpu=f, default=g)

    def pair(k):
        return lambda x, g, w: (k[1](g, w), k[2](x, g))

    both = None if a[3] is None and b[3] is None else pd(a[3] or pair(a), b[3] or pair(b))
    return make_family(pd(a[0], b[0]), pd(a[1], b[1]), pd(a[2], b[2]), both)



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


def _int_tuple(name: str, value: Sequence[int], rank: int, minimum: int) -> tuple[int, ...]:
    out = tuple(int(v) for v in value)
    if len(out) != rank or any(v < minimum for v in out):
        raise ValueError(
            f"{name} must be {rank} ints >= {minimum} (one per spatial dim), got {tuple(value)!r}"
        )
    return out


def make_call(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int],
    padding: Pairs,
    dilation: Sequence[int],
) -> DepthwiseCall:
    """Validate the arguments of :func:`depthwise_conv` and describe the call."""
    rank = x.ndim - 2
    if not 1 <= rank <= 3:
        raise ValueError(f"x must have rank 3, 4 or 5 (N, *spatial, C), got shape {x.shape}")
    if kernel.ndim != rank + 2 or kernel.shape[-2] != 1:
        raise ValueError(
            f"kernel must have shape (*kernel_size, 1, C * M) with {rank} spatial dims "
            f"for x of shape {x.shape}, got {kernel.shape}"
        )
    channels = x.shape[-1]
    if channels < 1 or kernel.shape[-1] < channels or kernel.shape[-1] % channels:
        raise ValueError(
            f"kernel.shape[-1] must be a positive multiple of the {channels} input channels "
            f"(C * depth multiplier), got kernel shape {kernel.shape}"
        )
    if x.dtype != kernel.dtype:
        raise TypeError(
            f"x and kernel must have the same dtype, got x {x.dtype} and kernel {kernel.dtype}"
        )
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pads) != rank or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(
            f"padding must be {rank} non-negative (lo, hi) pairs, got {tuple(padding)!r}"
        )
    return DepthwiseCall(
        rank=rank,
        channels=channels,
        depth_multiplier=kernel.shape[-1] // channels,
        kernel_size=tuple(kernel.shape[:rank]),
        strides=_int_tuple("strides", strides, rank, 1),
        dilation=_int_tuple("dilation", dilation, rank, 1),
        padding=pads,  # type: ignore[arg-type]
        dtype=x.dtype,
        backend=jax.default_backend(),
        spatial=tuple(x.shape[1:-1]),
        batch=x.shape[0],
    )


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
        channel ``o // M`` (PyTorch ``groups=C`` order). Same dtype as ``x``.
      strides, dilation: one int per spatial dim.
      padding: explicit non-negative ``(lo, hi)`` zero padding per spatial dim.
      impl: ``"auto"`` or a name in :data:`IMPLS`.
      precision: passed to the ``"xla"`` path; the CPU fast paths always
        multiply in float32 (the most precise setting).
    Returns:
      ``(N, *out_spatial, C * M)`` in ``x.dtype`` (float32 accumulation for
      bfloat16/float16 inputs).
    """
    call = make_call(x, kernel, strides=strides, padding=padding, dilation=dilation)
    impl = with_policy("depthwise", impl)
    if impl != "auto":
        return IMPLS[select_impl(call, impl)].fn(x, kernel, call, precision)
    calls = {p: replace(call, backend=p) for p in ("cpu", "default")}
    cpu, other = (select_impl(calls[p], "auto") for p in ("cpu", "default"))
    if cpu != other and IMPLS[cpu].kernels and IMPLS[other].kernels:
        return _platform_family(cpu, other, (calls["cpu"], calls["default"]), precision).conv(x, kernel)

    def run(name: str, platform: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda x, kernel: IMPLS[name].fn(x, kernel, calls[platform], precision)

    return on_platforms((x, kernel), lambda p: select_impl(calls[p], "auto"), run)
