"""Native pointwise (1x1) conv GEMM for CPU through ``jax.ffi`` (``impl="native"``).

The C++ GEMM lives in the library that :mod:`jaxdsc.ops.native` loads; this
module registers its targets ``jaxdsc_pw_*`` and self-check there as the
``"pointwise"`` family, and holds the FFI calls (with their per-shard forms,
:mod:`jaxdsc.ops._partition`) and their differentiable (any-order) wrappers.

y[M, N] = x[M, K] . w[K, N] + b on the (N * spatial, C) view: a tall-skinny
GEMM with packed w, register tiles of 6 x 64 floats (AVX-512), rows split
over XLA's intra-op pool; the weight gradient sums per-task partials in a
fixed order (deterministic) and also yields the bias gradient.

With ``precision=lax.DotAlgorithmPreset.BF16_BF16_F32`` on a CPU with AMX
(Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4 and later, Intel
Cooper Lake) the ``jaxdsc_pwmm_*`` targets run instead (family
``"pointwise_bf16"``): operands rounded to bfloat16, products summed in
float32, on the AMX tiles or by VDPBF16PS (:func:`bf16_isa` says which),
forward and both derivatives; float32 or bfloat16 in and out as the others.
Elsewhere that preset computes in float32, as XLA:CPU does with it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdsc.ops import native
from jaxdsc.ops._partition import BATCH, SUM, batch_op
from jaxdsc.ops._vjp import BiasKernels, Family, make_family

FAMILY = "pointwise"
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # the kernels' dtypes
TARGETS = ("jaxdsc_pw_forward", "jaxdsc_pw_grad_input", "jaxdsc_pw_grad_kernel", "jaxdsc_pw_grad_all")
BF16_FAMILY = "pointwise_bf16"
BF16_TARGETS = ("jaxdsc_pwmm_forward", "jaxdsc_pwmm_grad_input", "jaxdsc_pwmm_grad_kernel")
BF16_PRODUCTS = lax.DotAlgorithmPreset.BF16_BF16_F32
BF16_ISAS = ("amx", "avx512_bf16")  # best first

# Module switch for benchmarks and tests: False never runs the bfloat16-product kernels.
USE_BF16_KERNELS = True


def available() -> bool:
    """True when the native pointwise GEMM is built, loaded and self-checked."""
    return native.available(FAMILY)


def bf16_products(precision: lax.PrecisionLike) -> bool:
    """Whether ``precision`` asks for bfloat16 products with float32 sums (``BF16_BF16_F32``)."""
    return isinstance(precision, lax.DotAlgorithmPreset) and precision == BF16_PRODUCTS


@functools.cache
def _bf16_lib() -> ctypes.CDLL:
    """The library with the ISA functions' C signatures declared (once)."""
    lib = native.library()
    lib.jaxdsc_bf16mm_isa.restype = lib.jaxdsc_bf16mm_best_isa.restype = ctypes.c_char_p
    lib.jaxdsc_bf16mm_set_isa.argtypes = [ctypes.c_char_p]
    return lib


def _isa_call(name: str) -> str:
    return getattr(_bf16_lib(), name)().decode()


def _isas_from(best: str) -> tuple[str, ...]:
    """``best`` and the ISAs below it (AMX implies AVX512-BF16); empty for ``"none"``."""
    return BF16_ISAS[BF16_ISAS.index(best):] if best in BF16_ISAS else ()


def bf16_isa() -> str:
    """Where ``BF16_BF16_F32`` pointwise GEMMs run now: ``"amx"``, ``"avx512_bf16"`` or ``"none"``
    (no such kernels here: the native float32 GEMM runs instead)."""
    if not (USE_BF16_KERNELS and available() and native.available(BF16_FAMILY)):
        return "none"
    return _isa_call("jaxdsc_bf16mm_isa")


def bf16_kernels_available() -> bool:
    """True when the bfloat16-product GEMMs run on this CPU and passed their check."""
    return bf16_isa() != "none"


def amx_available() -> bool:
    """True when the bfloat16-product GEMMs run on AMX tiles (present, granted by the OS, selected)."""
    return bf16_isa() == "amx"


def set_bf16_isa(name: str) -> str:
    """Run the bfloat16-product GEMMs on ``name`` (``"amx"``, ``"avx512_bf16"`` or ``"best"``) from
    the next call on, jitted or not; returns the previous ISA (for tests and benchmarks)."""
    if name not in (*BF16_ISAS, "best"):
        raise ValueError(f"name must be one of {(*BF16_ISAS, 'best')}, got {name!r}")
    before = _isa_call("jaxdsc_bf16mm_isa")
    if not _bf16_lib().jaxdsc_bf16mm_set_isa(name.encode()):
        raise ValueError(f"this CPU cannot run the bfloat16-product GEMMs on {name!r} "
                         f"(best here: {_isa_call('jaxdsc_bf16mm_best_isa')!r})")
    return before


def supported_bf16_isas() -> tuple[str, ...]:
    """The ISAs :func:`set_bf16_isa` accepts on this CPU (empty without the library or the hardware)."""
    if not available() or native.unavailable_reason(BF16_FAMILY).startswith("not for this CPU"):
        return ()
    return _isas_from(_isa_call("jaxdsc_bf16mm_best_isa"))


def _bf16_supported() -> str:
    if _isa_call("jaxdsc_bf16mm_best_isa") != "none":
        return ""
    return "neither AMX-BF16 (granted by the OS) nor AVX512-BF16"


def _ffi_targets(prefix: str) -> tuple[Callable, Callable, Callable]:
    """The forward, input-gradient and kernel+bias-gradient calls of the targets ``prefix_*``."""

    def forward(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
        return jax.ffi.ffi_call(f"{prefix}_forward", out, vmap_method="sequential")(x, w, b)

    def grad_input(g: jax.Array, w: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((g.shape[0], w.shape[0]), g.dtype)
        return jax.ffi.ffi_call(f"{prefix}_grad_input", out, vmap_method="sequential")(g, w)

    def grad_kernel_bias(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = (
            jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), x.dtype),
            jax.ShapeDtypeStruct((g.shape[1],), x.dtype),
        )
        dw, db = jax.ffi.ffi_call(f"{prefix}_grad_kernel", out, vmap_method="sequential")(x, g)
        return dw, db

    return forward, grad_input, grad_kernel_bias


_ffi_pw_forward, _ffi_pw_grad_input, _ffi_pw_grad_kernel_bias = _ffi_targets("jaxdsc_pw")
_ffi_mm_forward, _ffi_mm_grad_input, _ffi_mm_grad_kernel_bias = _ffi_targets("jaxdsc_pwmm")


def _ffi_pw_grad_all(
    x: jax.Array, g: jax.Array, w: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dw, db) in one pass over g: each chunk of g rows feeds dx, then dw, from cache."""
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(w.shape, x.dtype),
        jax.ShapeDtypeStruct((w.shape[1],), x.dtype),
    )
    return jax.ffi.ffi_call("jaxdsc_pw_grad_all", out, vmap_method="sequential")(x, g, w)


# Rows (axis 0 of the 2-D views) are N * spatial: split with the batch.
_pw_forward = batch_op(_ffi_pw_forward, batched=(True, False, False), outputs=(BATCH,))
_pw_grad_input = batch_op(_ffi_pw_grad_input, batched=(True, False), outputs=(BATCH,))
_pw_grad_kernel_bias = batch_op(_ffi_pw_grad_kernel_bias, batched=(True, True), outputs=(SUM, SUM))
_pw_grad_all = batch_op(_ffi_pw_grad_all, batched=(True, True, False), outputs=(BATCH, SUM, SUM))


_mm_forward = batch_op(_ffi_mm_forward, batched=(True, False, False), outputs=(BATCH,))
_mm_grad_input = batch_op(_ffi_mm_grad_input, batched=(True, False), outputs=(BATCH,))
_mm_grad_kernel_bias = batch_op(_ffi_mm_grad_kernel_bias, batched=(True, True), outputs=(SUM, SUM))


# Backward pass as one kernel (dx, dw, db from a single pass over g), or as
# separate dx and (dw, db) kernels; a module switch for benchmarks.
PW_FUSED_BACKWARD = True


class _Raw(NamedTuple):
    """Raw kernels on 2-D views: the native calls, XLA's, or a per-platform choice of the two."""

    forward: Callable  # (x, w, b) -> x w + b
    grad_input: Callable  # (g, w) -> g w^T
    grad_kernel_bias: Callable  # (x, g) -> (x^T g, colsum g)
    grad_all: Callable  # (x, g, w) -> (g w^T, x^T g, colsum g)


_NATIVE = _Raw(_pw_forward, _pw_grad_input, _pw_grad_kernel_bias, _pw_grad_all)
# bfloat16 products: no fused backward (dx and dw are separate passes, each cheaper than float32's).
_BF16 = _Raw(_mm_forward, _mm_grad_input, _mm_grad_kernel_bias,
             lambda x, g, w: (_mm_grad_input(g, w), *_mm_grad_kernel_bias(x, g)))


@functools.lru_cache(maxsize=16)
def _xla_raw(precision) -> _Raw:
    def dot(a, b, contract):
        acc = jnp.float32 if a.dtype in (jnp.bfloat16, jnp.float16) else None
        return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                               preferred_element_type=acc).astype(a.dtype)

    def grad_kernel_bias(x, g):
        return dot(x, g, ((0,), (0,))), jnp.sum(g.astype(jnp.float32), axis=0).astype(x.dtype)

    return _Raw(
        lambda x, w, b: (dot(x, w, ((1,), (0,))) + b).astype(x.dtype),
        lambda g, w: dot(g, w, ((1,), (1,))),
        grad_kernel_bias,
        lambda x, g, w: (dot(g, w, ((1,), (1,))), *grad_kernel_bias(x, g)),
    )


@functools.lru_cache(maxsize=16)
def _platform_raw(precision, native_raw: _Raw = _NATIVE) -> _Raw:
    """Native kernels in the CPU branch of the program, XLA's elsewhere.

    The choice sits in the raw kernels that the tangent maps and their
    transposes call (:mod:`jaxdsc.ops._linear`), so differentiation, forward or
    reverse, never goes through a cond (linearising and transposing one made
    tracing slower).
    """
    xla = _xla_raw(precision)

    def pd(f, g):
        return lambda *args: lax.platform_dependent(*args, cpu=f, default=g)

    return _Raw(*(pd(a, b) for a, b in zip(native_raw, xla, strict=True)))


@functools.lru_cache(maxsize=16)
def _pw_ops(fused: bool, raw: _Raw = _NATIVE) -> Family:
    """Differentiable (any order, forward and reverse mode) pointwise ops on 2-D views from ``raw``."""
    _pw_forward, _pw_grad_input, _pw_grad_kernel_bias, _pw_grad_all = raw

    def _pw_forward_nobias(x, w):
        return _pw_forward(x, w, jnp.zeros((w.shape[1],), x.dtype))

    return make_family(
        _pw_forward_nobias,
        _pw_grad_input,
        lambda x, g: _pw_grad_kernel_bias(x, g)[0],
        (lambda x, g, w: _pw_grad_all(x, g, w)[:2]) if fused else None,
        bias=BiasKernels(_pw_forward, _pw_grad_kernel_bias, _pw_grad_all if fused else None),
    )


def pointwise_supports(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> bool:
    """float32 or bfloat16 operands of one dtype, non-empty channel dims, library available."""
    dtype = jnp.dtype(x.dtype)
    return (
        dtype in DTYPES
        and jnp.dtype(kernel.dtype) == dtype
        and (bias is None or jnp.dtype(bias.dtype) == dtype)
        and x.ndim >= 1
        and kernel.ndim == 2
        and min(kernel.shape) >= 1
        and available()
    )


def pointwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                   portable: bool = False, precision: lax.PrecisionLike = None) -> jax.Array:
    """``impl="native"`` pointwise conv: ``x (..., K) . kernel (K, N) + bias (N,)``.

    ``portable``: native in the CPU branch of the program only, ``dot_general``
    with ``precision`` on other platforms (what ``impl="auto"`` runs).
    ``precision``: ``BF16_BF16_F32`` runs the bfloat16-product kernels where
    :func:`bf16_kernels_available`; the native kernels otherwise compute in float32.
    """
    bf16 = bf16_products(precision) and bf16_kernels_available()
    raw = _BF16 if bf16 else _NATIVE
    ops = _pw_ops(PW_FUSED_BACKWARD and not bf16, _platform_raw(precision, raw) if portable else raw)
    x2 = x.reshape(-1, x.shape[-1])
    y2 = ops.conv(x2, kernel) if bias is None else ops.affine(x2, kernel, bias)
    return y2.reshape(*x.shape[:-1], kernel.shape[-1])


def _check(forward: Callable, grad_input: Callable, grad_kernel_bias: Callable, m: int, k: int, n: int,
           seed: int, rounded: bool) -> tuple[bool, tuple[np.ndarray, ...]]:
    """Targets against numpy on random (m, k) x (k, n) operands (the product of their bfloat16
    roundings if ``rounded``); also returns the operands (x, w, b, g)."""
    rng = np.random.default_rng(seed)
    x, w, b, g = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,), (m, n)))
    xr, wr, gr = ((v.astype(jnp.bfloat16).astype(np.float64) if rounded else v) for v in (x, w, g))
    y = np.asarray(jax.jit(forward)(x, w, b))
    dx = np.asarray(jax.jit(grad_input)(g, w))
    dw, db = (np.asarray(v) for v in jax.jit(grad_kernel_bias)(x, g))
    return _agree(((y, xr @ wr + b), (dx, gr @ wr.T), (dw, xr.T @ gr), (db, g.sum(0)))), (x, w, b, g)


def _agree(pairs) -> bool:
    return all(got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=1e-4) for got, ref in pairs)


def self_check() -> str:
    """The pointwise targets on a small odd case against numpy; "" if they agree."""
    ok, (x, w, _, g) = _check(_ffi_pw_forward, _ffi_pw_grad_input, _ffi_pw_grad_kernel_bias, 23, 7, 19, 1, False)
    dx2, dw2, db2 = (np.asarray(v) for v in jax.jit(_ffi_pw_grad_all)(x, g, w))
    ok = ok and _agree(((dx2, g @ w.T), (dw2, x.T @ g), (db2, g.sum(0))))
    return "" if ok else "a target disagrees with the numpy reference"


def bf16_self_check() -> str:
    """The bfloat16-product targets on an odd case (row, reduction and column tails) against numpy, on
    each ISA this CPU has (the selection restored after); "" if they agree."""
    lib = _bf16_lib()
    before = _isa_call("jaxdsc_bf16mm_isa")
    try:
        for isa in _isas_from(_isa_call("jaxdsc_bf16mm_best_isa")):
            lib.jaxdsc_bf16mm_set_isa(isa.encode())
            ok, _ = _check(_ffi_mm_forward, _ffi_mm_grad_input, _ffi_mm_grad_kernel_bias, 301, 37, 19, 2, True)
            if not ok:
                return f"the {isa} targets disagree with the numpy reference"
    finally:
        lib.jaxdsc_bf16mm_set_isa(before.encode())
    return ""


native.register_family(FAMILY, TARGETS, self_check)
native.register_family(BF16_FAMILY, BF16_TARGETS, bf16_self_check, requires=(FAMILY,),
                       supported=_bf16_supported)
