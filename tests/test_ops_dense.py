"""Dense conv implementations (``jaxdsc.ops.dense``): ``"native"`` (implicit-im2col GEMM,
issues 15/17) and ``"patches"`` (im2col + GEMM, issue 5) against ``"xla"``
(``lax.conv_general_dilated``) and float64, values and gradients.

Configurations come from hypothesis (ranks 1-3, kernel sizes, strides, dilations,
asymmetric and negative padding, 1-9 input channels; causal dilated 1-D convs
with up to 70 channels) plus fixed cases (the CIFAR and xception stems, a 1x1
kernel, several GEMM panels and K blocks, rows split over tasks). Tolerances,
relative to the largest reference magnitude:

* float64 (x64 enabled, ``"patches"``): 1e-10. Both paths sum the same products
  in a different order; the float64 GEMM and conv agree to ~1e-15.
* float32: 1e-5, against ``"xla"`` and against the float64 reference of the same
  float32 inputs. Each output sums prod(kernel_size) * C_in <= 630 products
  (the weight gradient N * out_spatial <= 8192 of them) in some order, each
  rounding contributing at most 6e-8 of the running sum; observed below 1e-6.
  A wrong tap, offset, padding value or channel order gives errors of order 1.
* bfloat16: 1e-2; all paths accumulate in float32 and round once to bfloat16 (2**-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ISAS, native_isa, x64_enabled
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdsc
from jaxdsc.ops import native_dense
from jaxdsc.ops.dense import DENSE_IMPLS, PATCHES_MAX_IN, dense_conv, select_dense_impl

F64_IMPLS = ("xla", "patches")  # the native kernels are float32 / bfloat16 only
# Without the library (a checkout built without a compiler) "native" is refused; CI sets
# JAXDSC_REQUIRE_NATIVE=1, which fails the run instead (conftest.py).
IMPLS = tuple(i for i in DENSE_IMPLS if i != "native" or native_dense.available())
needs_native = pytest.mark.skipif(not native_dense.available(),
                                  reason="native dense conv unavailable (library not built)")

PROPS = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
# The native properties compile three programs per example (native, xla, float64 xla): fewer examples,
# the fixed cases below cover the stems, several panels and K blocks, and multi-task splits.
NATIVE_PROPS = settings(PROPS, max_examples=12)


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30))


@st.composite
def conv_configs(draw):
    rank = draw(st.integers(1, 3))
    ks = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    pads = tuple((draw(st.integers(-1, 2)), draw(st.integers(-1, 2))) for _ in range(rank))
    # Spatial sizes large enough for the dilated kernel after (possibly negative) padding.
    spatial = tuple(max(d * (k - 1) + 3 - lo - hi, 1) + draw(st.integers(0, 3))
                    for k, d, (lo, hi) in zip(ks, dil, pads, strict=True))
    c_in, c_out = draw(st.integers(1, 9)), draw(st.integers(1, 17))
    n = draw(st.integers(1, 3))
    return (n, *spatial, c_in), ks, strides, dil, pads, c_out


def _each(x, w, strides, dil, pads, fn, impls=IMPLS):
    return [fn(lambda x, w, impl=impl: dense_conv(x, w, strides=strides, padding=pads, dilation=dil,
                                                  impl=impl), x, w) for impl in impls]


def _value_and_grads(f, x, w):
    y, vjp = jax.vjp(f, x, w)
    g = jnp.asarray(np.random.default_rng(3).normal(size=y.shape), y.dtype)
    return (y, *vjp(g))


@PROPS
@given(cfg=conv_configs())
def test_patches_match_xla_float64(cfg):
    shape, ks, strides, dil, pads, c_out = cfg
    rng = np.random.default_rng(0)
    with x64_enabled():
        x = jnp.asarray(rng.normal(size=shape))
        w = jnp.asarray(rng.normal(size=(*ks, shape[-1], c_out)))
        xla, patches = _each(x, w, strides, dil, pads, lambda f, x, w: jax.jit(
            lambda x, w: _value_and_grads(f, x, w))(x, w), F64_IMPLS)
        for name, a, b in zip(("y", "dx", "dw"), patches, xla, strict=True):
            assert _rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("shape,ks,strides,dil,pads,c_out", [
    ((4, 32, 32, 3), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 32),  # the CIFAR stem
    ((2, 9, 8, 5), (3, 3), (2, 1), (2, 1), ((2, 2), (0, 1)), 16),
    ((2, 7, 4), (1,), (1,), (1,), ((0, 0),), 5),
    ((1, 5, 6, 7, 2), (2, 3, 2), (1, 2, 1), (1, 1, 2), ((1, 0), (1, 1), (0, 2)), 9),
    ((2, 23, 21, 3), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), 32),  # xception's first stem conv
    ((2, 12, 11, 70), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 130),  # K = 630: K blocks, 3 panels
    ((2, 40, 64), (3,), (1,), (16,), ((32, 0),), 64),  # the dense TCN's causal conv, dilation 16
    ((2, 15, 14, 9), (1, 1), (2, 2), (1, 1), ((0, 0), (0, 0)), 12),  # xception's 1x1 s2 shortcut
    ((2, 10, 7, 5), (1, 1), (2, 3), (1, 1), ((1, 0), (-1, 2)), 6),  # strided 1x1, uneven padding
])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_impls_match_xla(shape, ks, strides, dil, pads, c_out, dtype, tol):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=(*ks, shape[-1], c_out)), dtype)
    xla, *others = _each(x, w, strides, dil, pads, lambda f, x, w: jax.jit(
        lambda x, w: _value_and_grads(f, x, w))(x, w))
    for impl, got in zip(IMPLS[1:], others, strict=True):
        for name, a, b in zip(("y", "dx", "dw"), got, xla, strict=True):
            assert a.dtype == dtype, (impl, name)
            assert _rel_err(a, b) < tol, (impl, name)


def _native_against_references(shape, ks, strides, dil, pads, c_out, seed=0):
    """native float32 (value, dx, dw) against "xla" float32 and the float64 reference, 1e-5."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(*ks, shape[-1], c_out)).astype(np.float32)
    run = lambda f, x, w: jax.jit(lambda x, w: _value_and_grads(f, x, w))(x, w)  # noqa: E731
    xla, native = _each(jnp.asarray(x), jnp.asarray(w), strides, dil, pads, run, ("xla", "native"))
    with x64_enabled():
        (ref,) = _each(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), strides, dil, pads,
                       run, ("xla",))
        ref = [np.asarray(r) for r in ref]
    for name, a, b, r in zip(("y", "dx", "dw"), native, xla, ref, strict=True):
        assert a.dtype == jnp.float32, name
        assert _rel_err(a, b) < 1e-5, name
        assert _rel_err(a, r) < 1e-5, name


@needs_native
@NATIVE_PROPS
@given(cfg=conv_configs())
def test_native_matches_xla_and_float64(cfg):
    shape, ks, strides, dil, pads, c_out = cfg
    _native_against_references(shape, ks, strides, dil, pads, c_out)


@st.composite
def causal_configs(draw):
    """The TCN's conv: 1-D, left padding d (k - 1), stride 1, dilation up to 9."""
    k, d = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    t = draw(st.integers(1, 3 * d * k + 5))
    c_in, c_out = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    return (draw(st.integers(1, 3)), t, c_in), (k,), (1,), (d,), ((d * (k - 1), 0),), c_out


@needs_native
@NATIVE_PROPS
@given(cfg=causal_configs())
def test_native_causal_1d_matches_xla_and_float64(cfg):
    _native_against_references(*cfg)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_on_every_isa(isa):
    """The generic (4-float vectors) and AVX2 builds gather and tile differently from AVX-512."""
    with native_isa(isa):
        _native_against_references((2, 9, 8, 5), (3, 3), (2, 1), (2, 1), ((2, 2), (0, 1)), 16)
        _native_against_references((2, 13, 21, 3), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), 32)
        _native_against_references((2, 30, 40), (3,), (1,), (4,), ((8, 0),), 70)


@needs_native
def test_native_higher_order_and_vmap():
    """jvp, forward-over-reverse (Hessian-vector product) and vmap agree with "xla"."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 2, 4, 5)), jnp.float32)
    tx, tw = (jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in (x, w))
    for strides in ((1, 1), (2, 1)):
        def f(x, w, impl, strides=strides):
            y = dense_conv(x, w, strides=strides, padding=((1, 1), (0, 1)), dilation=(1, 2), impl=impl)
            return jnp.sum(jnp.sin(y))

        def hvp(impl, f=f):
            grad = jax.grad(lambda x, w: f(x, w, impl), argnums=(0, 1))
            return jax.jvp(grad, (x, w), (tx, tw))

        for a, b in zip(jax.tree.leaves(jax.jit(hvp, static_argnums=0)("native")),
                        jax.tree.leaves(jax.jit(hvp, static_argnums=0)("xla")), strict=True):
            assert _rel_err(a, b) < 1e-5, strides
        batched = [jax.vmap(lambda x, impl=impl, f=f: jax.grad(f)(x, w, impl))(x[:, None]) for impl in
                   ("native", "xla")]
        assert _rel_err(*batched) < 1e-5, strides


def test_auto_selection():
    native = native_dense.available()
    for c in (1, 3, PATCHES_MAX_IN, PATCHES_MAX_IN + 1, 64):
        for dtype in (jnp.float32, jnp.bfloat16):
            want = "native" if native else "patches" if c <= PATCHES_MAX_IN else "xla"
            assert select_dense_impl(jnp.zeros((1, 4, 4, c), dtype), "auto", platform="cpu") == want
        assert select_dense_impl(jnp.zeros((1, 4, 4, c)), "auto", platform="default") == "xla"
        # 1x1 kernels: the pointwise GEMM (after a strided slice at most), no gathering
        one = select_dense_impl(jnp.zeros((1, 4, 4, c)), "auto", platform="cpu", kernel_size=(1, 1))
        assert one == ("patches" if native or c <= PATCHES_MAX_IN else "xla")
        # float16: no native kernel; im2col in memory only for few channels
        want = "patches" if c <= PATCHES_MAX_IN else "xla"
        assert select_dense_impl(jnp.zeros((1, 4, 4, c), jnp.float16), "auto", platform="cpu") == want
    for impl in DENSE_IMPLS:
        assert select_dense_impl(jnp.zeros((1, 4, 4, 3)), impl) == impl
    with pytest.raises(ValueError, match=r"impl must be 'auto' or one of .*'im2col'"):
        select_dense_impl(jnp.zeros((1, 4, 4, 3)), "im2col")


def test_conv_module_impls_agree_and_validate():
    mods = {impl: jaxdsc.Conv(3, 8, 3, strides=2, padding="REFLECT", kernel_dilation=1, impl=impl,
                              rngs=nnx.Rngs(0)) for impl in ("auto", *IMPLS)}
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, 3)), jnp.float32)
    ref = mods["xla"](x)
    for impl, m in mods.items():
        assert _rel_err(m(x), ref) < 1e-5, impl
    with pytest.raises(ValueError, match=r"impl must be 'auto' or one of \[.*'patches'.*\] \(the dense op\), got 'im2col'"):
        jaxdsc.Conv(3, 8, 3, impl="im2col", rngs=nnx.Rngs(0))


def test_bad_shapes_name_the_problem():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"kernel must be \(\*kernel_size, C_in, C_out\)"):
        dense_conv(x, jnp.zeros((3, 3, 2, 4)), strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1))
    with pytest.raises(ValueError, match=r"strides, padding and dilation need 2 entries"):
        dense_conv(x, jnp.zeros((3, 3, 3, 4)), strides=(1,), padding=((0, 0), (0, 0)), dilation=(1, 1))
    for impl in IMPLS[1:]:  # "xla" has its own message
        with pytest.raises(ValueError, match=r"smaller than the dilated kernel"):
            dense_conv(x, jnp.zeros((3, 3, 3, 4)), strides=(1, 1), padding=((0, 0), (0, 0)),
                       dilation=(3, 3), impl=impl)


def test_native_refuses_other_dtypes():
    with pytest.raises(ValueError, match=r"impl='native' \(dense conv\) needs float32 or bfloat16.*float16"):
        dense_conv(jnp.zeros((1, 4, 4, 3), jnp.float16), jnp.zeros((3, 3, 3, 4), jnp.float16),
                   strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), impl="native")
