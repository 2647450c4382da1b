"""The bfloat16-product pointwise GEMMs: ``precision=lax.DotAlgorithmPreset.BF16_BF16_F32`` on the
native path, on every ISA this CPU has for them (AMX tiles, AVX512-BF16 dot products).

Each target rounds its operands to bfloat16 and sums the exact products in
float32, so it is compared with the float64 result of the rounded operands
at 1e-5 of the largest magnitude (float32 sums of up to a few thousand terms;
observed below 1e-6), for the forward and the input, kernel and bias
gradients (the bias gradient sums the unrounded g). That tolerance also
proves the rounding happened: the unrounded float32 result differs by about
1e-3 (checked). bfloat16 operands: 1e-2, as in test_ops_pointwise.py. Each
kernel test runs once per ISA of :func:`supported_bf16_isas` (skipped, with
the reason, on a CPU with neither); the fallback (float32) is checked everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_ops_pointwise import CASES, _operands, _reference, _rel_err
from test_ops_pointwise import _run as _run_impl

from jaxdsc.ops import native, native_pointwise, pointwise_conv

P = lax.DotAlgorithmPreset.BF16_BF16_F32
ISAS = native_pointwise.supported_bf16_isas()
NO_ISA = "no AMX-BF16 (granted by the OS) or AVX512-BF16 here, or the native library is missing"


@pytest.fixture(params=ISAS or [pytest.param("none", marks=pytest.mark.skip(reason=NO_ISA))])
def isa(request):
    """Each test body on one bfloat16-product ISA; the best one restored after."""
    before = native_pointwise.set_bf16_isa(request.param)
    try:
        assert native_pointwise.bf16_isa() == request.param
        yield request.param
    finally:
        native_pointwise.set_bf16_isa(before)


def _round(v):
    return None if v is None else jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32)


def _run(x, w, b, g, impl="native", precision=P):
    return _run_impl(impl, x, w, b, g, precision)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}")
def test_products_of_rounded_operands(isa, case, bias):
    x, w, b, g = _operands(0, *case, jnp.float32, bias)
    got = _run(x, w, b, g)
    ref = _reference(_round(x), _round(w), b, _round(g))
    if b is not None:  # the bias gradient sums g as given
        ref[3] = _reference(x, w, b, g)[3]
    assert len(got) == len(ref)
    for name, a, r in zip(("y", "dx", "dw", "db"), got, ref, strict=False):
        assert a.dtype == jnp.float32, name
        err = _rel_err(a, r)
        assert err <= 1e-5, f"{name}: relative error {err:.2e} > 1e-05"


def test_differs_from_float32(isa):
    """The tolerance above separates the two: float32 products miss the rounded reference by >> 1e-5."""
    x, w, b, g = _operands(1, *CASES[5], jnp.float32)
    y = _run(x, w, b, g, precision=None)[0]
    assert _rel_err(y, _reference(_round(x), _round(w), b, g)[0]) > 1e-4


@pytest.mark.parametrize("case", CASES[3:], ids=lambda c: f"{c[0]}->{c[1]}")
def test_bfloat16_operands(isa, case):
    x, w, b, g = _operands(2, *case, jnp.bfloat16)
    for name, a, r in zip(("y", "dx", "dw", "db"), _run(x, w, b, g), _reference(x, w, b, g), strict=True):
        assert a.dtype == jnp.bfloat16, name
        assert _rel_err(a, r) <= 1e-2, name


def test_auto_runs_bf16_kernels_and_is_deterministic(isa):
    """``impl="auto"`` (native in the CPU branch) takes these kernels too; the weight gradient's
    partial sums are added in a fixed order."""
    x, w, b, g = _operands(3, (8, 32, 32, 16), 24, jnp.float32)
    first = [np.asarray(v) for v in _run(x, w, b, g, impl="native")]
    for _ in range(2):
        for a, r in zip(_run(x, w, b, g, impl="auto"), first, strict=True):
            np.testing.assert_array_equal(np.asarray(a), r)


def test_second_order_gradients_and_vmap(isa):
    x, w, b, _ = _operands(4, (2, 5, 5, 40), 24, jnp.float32)

    def loss(x, w, impl, precision):
        return jnp.sum(jnp.tanh(pointwise_conv(x, w, b, impl=impl, precision=precision)) ** 2)

    def hvp(impl, precision):
        gx = lambda x, w: jax.grad(loss)(x, w, impl, precision)  # noqa: E731
        return jax.jit(jax.jvp, static_argnums=0)(gx, (x, w), (jnp.ones_like(x), jnp.zeros_like(w)))[1]

    # Every derivative multiplies rounded operands: within bfloat16 error (2**-8 a rounding) of float64.
    assert _rel_err(hvp("native", P), np.asarray(hvp("xla", lax.Precision.HIGHEST))) <= 2e-2
    got = jax.vmap(lambda xi: pointwise_conv(xi, w, b, impl="native", precision=P))(x[:, None])
    ref = _reference(_round(x), _round(w), b, jnp.zeros((*x.shape[:-1], 24)))[0]
    assert _rel_err(got[:, 0], ref) <= 1e-5


@pytest.mark.skipif(not native.available("pointwise"), reason="native pointwise GEMM unavailable")
def test_without_bf16_kernels_the_preset_computes_in_float32(monkeypatch):
    """``USE_BF16_KERNELS = False`` (what a CPU with neither ISA gets): the float32 kernels, bit for bit."""
    monkeypatch.setattr(native_pointwise, "USE_BF16_KERNELS", False)
    assert native_pointwise.bf16_isa() == "none" and not native_pointwise.bf16_kernels_available()
    x, w, b, g = _operands(5, *CASES[6], jnp.float32)
    for a, r in zip(_run(x, w, b, g), _run(x, w, b, g, precision=None), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


def test_bf16_products_recognises_only_the_preset():
    assert native_pointwise.bf16_products(P)
    for other in (None, "bfloat16", lax.Precision.DEFAULT, lax.Precision.HIGHEST,
                  lax.DotAlgorithmPreset.F32_F32_F32):
        assert not native_pointwise.bf16_products(other), other


@pytest.mark.skipif(len(ISAS) < 2, reason="one bfloat16-product ISA here: nothing to compare")
def test_isas_agree():
    """AMX and AVX512-BF16 multiply the same rounded operands; only the float32 summation order differs."""
    x, w, b, g = _operands(6, *CASES[6], jnp.float32)
    got = {}
    for name in ISAS:
        before = native_pointwise.set_bf16_isa(name)
        try:
            got[name] = [np.asarray(v) for v in _run(x, w, b, g)]
        finally:
            native_pointwise.set_bf16_isa(before)
    for a, r in zip(*got.values(), strict=True):
        assert _rel_err(a, r) <= 1e-5


@pytest.mark.skipif(not native.available("pointwise"), reason="native pointwise GEMM unavailable")
def test_isa_selection_is_validated():
    with pytest.raises(ValueError, match="must be one of"):
        native_pointwise.set_bf16_isa("avx2")
    for name in native_pointwise.BF16_ISAS:
        if name not in ISAS:
            with pytest.raises(ValueError, match="cannot run"):
                native_pointwise.set_bf16_isa(name)
    assert native_pointwise.bf16_isa() in (*ISAS[:1], "none")


@pytest.mark.skipif(not native.library_present(), reason="native library not built")
def test_a_cpu_without_the_isas_is_not_a_missing_family():
    """``available()`` with no family asks only about the families this CPU can run: the bf16 family
    is unavailable without a warning where the CPU has neither ISA, and the rest stays available."""
    reason = native.unavailable_reason(native_pointwise.BF16_FAMILY)
    if ISAS:
        assert reason == ""
    else:
        assert reason.startswith("not for this CPU"), reason
    assert native.available() == all(
        native.available(f) for f in ("depthwise", "pointwise", "batchnorm", "separable", "dense"))
