"""Causality as a property: the output at time t never depends on inputs after t.

For random kernel sizes, dilations, lengths and cut points, replacing every
input after ``t`` must leave outputs ``0..t`` bit for bit unchanged (an output
that does not read an input cannot change with it, whatever the summation
order), and must change output ``t + 1`` (so the test can fail). Checked on
every depthwise implementation (``native``, ``shift``, ``xla``, ``auto``),
with the ``"CAUSAL"`` spec and its explicit ``((d*(k-1), 0),)`` equivalent,
the fused separable op, the dense conv (``xla``, ``patches``) and whole TCNs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_kwargs
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdsc
from jaxdsc.models import TCN
from jaxdsc.ops.depthwise import IMPLS
from jaxdsc.ops.native import available as native_available

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None)
DW_IMPLS = [*sorted(IMPLS), "auto"]

cases = st.tuples(
    st.integers(1, 4),   # kernel size
    st.integers(1, 8),   # dilation
    st.integers(1, 40),  # length
    st.data(),
)


@nnx.jit
def _call(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)


def _check(fn, x: np.ndarray, t: int, seed: int) -> None:
    x2 = x.copy()
    x2[:, t + 1:] = np.random.default_rng(seed).standard_normal(x2[:, t + 1:].shape) * 3.0
    y, y2 = np.asarray(fn(jnp.asarray(x))), np.asarray(fn(jnp.asarray(x2)))
    np.testing.assert_array_equal(y[:, : t + 1], y2[:, : t + 1])
    if t + 1 < x.shape[1]:
        assert not np.array_equal(y[:, t + 1], y2[:, t + 1]), "output t+1 ignores input t+1"


def _skip_native(impl: str) -> None:
    if impl == "native" and not native_available():
        pytest.skip("native library not built")


@pytest.mark.parametrize("padding", ["CAUSAL", "explicit"])
@pytest.mark.parametrize("impl", DW_IMPLS)
@SETTINGS
@given(cases)
def test_depthwise_and_separable_causal(impl, padding, case):
    _skip_native(impl)
    k, d, n, data = case
    t = data.draw(st.integers(0, n - 1))
    pad = "CAUSAL" if padding == "CAUSAL" else ((d * (k - 1), 0),)
    x = np.random.default_rng(n).standard_normal((2, n, 3)).astype(np.float32)
    dw = jaxdsc.DepthwiseConv(3, (k,), padding=pad, kernel_dilation=(d,), impl=impl, **init_kwargs(k))
    sep = jaxdsc.SeparableConv(3, 4, (k,), padding=pad, kernel_dilation=(d,), impl=impl, **init_kwargs(d))
    for module in (dw, sep):
        _check(lambda xx, m=module: _call(m, xx), x, t, seed=t)


@pytest.mark.parametrize("impl", ["xla", "patches", "auto"])
@SETTINGS
@given(cases)
def test_dense_causal(impl, case):
    k, d, n, data = case
    t = data.draw(st.integers(0, n - 1))
    conv = jaxdsc.Conv(3, 4, (k,), padding="CAUSAL", kernel_dilation=(d,), impl=impl, **init_kwargs(k))
    _check(lambda xx: _call(conv, xx),
           np.random.default_rng(n).standard_normal((2, n, 3)).astype(np.float32), t, seed=t)


@pytest.mark.parametrize("separable,impl", [(True, i) for i in DW_IMPLS] + [(False, "auto")])
@settings(max_examples=3, deadline=None, derandomize=True, database=None)
@given(st.integers(2, 3), st.integers(1, 3), st.integers(1, 30), st.data())
def test_tcn_causal(separable, impl, k, levels, n, data):
    _skip_native(impl)
    t = data.draw(st.integers(0, n - 1))
    m = nnx.eval_shape(lambda: TCN(2, 2, [4] * levels, kernel_size=k, separable=separable,
                                   gated=levels == 2, impl=impl, rngs=nnx.Rngs(levels)))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    rng = np.random.default_rng(k)
    params = jax.tree.map(lambda p: jnp.asarray(0.5 * rng.standard_normal(p.shape), p.dtype), params)
    m = nnx.merge(graphdef, params, rest)
    _check(lambda xx: _call(m, xx),
           np.random.default_rng(n).standard_normal((2, n, 2)).astype(np.float32), t, seed=t)
