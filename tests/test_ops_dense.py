"""Dense conv implementations (``jaxdsc.ops.dense``): ``"patches"`` (im2col + GEMM) against
``"xla"`` (``lax.conv_general_dilated``), values and gradients (issue 5).

Configurations come from hypothesis (ranks 1-3, kernel sizes, strides, dilations,
asymmetric and negative padding, 1-9 input channels) plus fixed cases (the
CIFAR stem, a 1x1 kernel). Tolerances, relative to the largest reference
magnitude:

* float64 (x64 enabled): 1e-10. Both paths sum the same products in a
  different order; the float64 GEMM and conv agree to ~1e-15.
* float32: 1e-5. Each output sums prod(kernel_size) * C_in <= 243 products
  (the weight gradient N * out_spatial of them) in some order; observed below 1e-6.
* bfloat16: 1e-2; both accumulate in float32 and round once to bfloat16 (2**-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64_enabled
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdsc
from jaxdsc.ops.dense import DENSE_IMPLS, PATCHES_MAX_IN, dense_conv, select_dense_impl

PROPS = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


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


def _both(x, w, strides, dil, pads, fn):
    return [fn(lambda x, w, impl=impl: dense_conv(x, w, strides=strides, padding=pads, dilation=dil,
                                                  impl=impl), x, w) for impl in DENSE_IMPLS]


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
        xla, patches = _both(x, w, strides, dil, pads, lambda f, x, w: jax.jit(
            lambda x, w: _value_and_grads(f, x, w))(x, w))
        for name, a, b in zip(("y", "dx", "dw"), patches, xla, strict=True):
            assert _rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("shape,ks,strides,dil,pads,c_out", [
    ((4, 32, 32, 3), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 32),  # the CIFAR stem
    ((2, 9, 8, 5), (3, 3), (2, 1), (2, 1), ((2, 2), (0, 1)), 16),
    ((2, 7, 4), (1,), (1,), (1,), ((0, 0),), 5),
    ((1, 5, 6, 7, 2), (2, 3, 2), (1, 2, 1), (1, 1, 2), ((1, 0), (1, 1), (0, 2)), 9),
])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_patches_match_xla(shape, ks, strides, dil, pads, c_out, dtype, tol):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=(*ks, shape[-1], c_out)), dtype)
    xla, patches = _both(x, w, strides, dil, pads, lambda f, x, w: jax.jit(
        lambda x, w: _value_and_grads(f, x, w))(x, w))
    for name, a, b in zip(("y", "dx", "dw"), patches, xla, strict=True):
        assert a.dtype == dtype, name
        assert _rel_err(a, b) < tol, name


def test_auto_selection():
    cpu = jax.default_backend() == "cpu"
    for c in (1, 3, PATCHES_MAX_IN):
        assert select_dense_impl(jnp.zeros((1, 4, 4, c)), "auto") == ("patches" if cpu else "xla")
    assert select_dense_impl(jnp.zeros((1, 4, 4, PATCHES_MAX_IN + 1)), "auto") == "xla"
    for impl in DENSE_IMPLS:
        assert select_dense_impl(jnp.zeros((1, 4, 4, 3)), impl) == impl
    with pytest.raises(ValueError, match=r"impl must be 'auto' or one of .*'im2col'"):
        select_dense_impl(jnp.zeros((1, 4, 4, 3)), "im2col")


def test_conv_module_impls_agree_and_validate():
    mods = {impl: jaxdsc.Conv(3, 8, 3, strides=2, padding="REFLECT", kernel_dilation=1, impl=impl,
                              rngs=nnx.Rngs(0)) for impl in ("auto", *DENSE_IMPLS)}
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
    with pytest.raises(ValueError, match=r"smaller than the dilated kernel"):
        dense_conv(x, jnp.zeros((3, 3, 3, 4)), strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(3, 3),
                   impl="patches")
