"""The fused separable forward (``jaxdsc.ops.separable``, native ``jaxdsc_sep_forward``), issue 5.

Checked against a float64 reference (the unfused pair on the ``"xla"`` paths
with x64 enabled), for ranks 1-3, strides, dilations, asymmetric padding,
depth multipliers, odd channel counts, with and without each bias; row groups
of one row (rows wider than the kernel's buffer), partial last groups and a
streamed (>= 8 MiB) output. That the fused kernel really ran is read from the
lowered HLO. Gradients go through the unfused pair and must match it.

Tolerance, relative to the largest reference magnitude: 1e-5 (float32: each
output sums k * C * M depthwise products and C * M pointwise ones in an order
of its own; observed errors are below 1e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ISAS, native_isa, x64_enabled
from flax import nnx

import jaxdsc
from jaxdsc.ops import separable
from jaxdsc.ops.separable import SEP_TARGET, fused_available, separable_conv

pytestmark = pytest.mark.skipif(not fused_available(), reason="native fused separable forward not built")

TOL = 1e-5

# (x shape, kernel size, strides, dilation, padding pairs, depth multiplier, C_out)
CASES = [
    ((4, 32, 32, 16), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, 16),
    ((3, 40, 36, 5), (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), 2, 17),  # odd C, C*M = 10
    ((16, 40, 24, 8), (5, 3), (2, 1), (1, 2), ((2, 1), (0, 3)), 1, 33),  # strides, asymmetric pads
    ((3, 4096, 8), (3,), (1,), (4,), ((4, 4),), 1, 24),  # rank 1, 128 KiB rows: groups of one row
    ((2, 6, 20, 20, 4), (3, 3, 3), (1, 1, 1), (1, 2, 1), ((1, 1), (2, 2), (1, 1)), 1, 12),  # rank 3
    ((8, 32, 32, 32), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, 256),  # 8 MiB output: streamed
]


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _operands(shape, ks, mult, c_out, dw_bias, pw_bias, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(size=shape)
    wd = rng.normal(size=(*ks, 1, c * mult))
    wp = rng.normal(size=(c * mult, c_out)) / np.sqrt(c * mult)
    bd = rng.normal(size=c * mult) if dw_bias else None
    bp = rng.normal(size=c_out) if pw_bias else None
    return x, wd, wp, bd, bp


def _fn(strides, dil, pads, impl="auto"):
    def f(x, wd, wp, bd, bp):
        return separable_conv(x, wd, wp, bd, bp, strides=strides, padding=pads, dilation=dil, impl=impl)
    return f


def _lowered(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x" + "x".join(map(str, c[0])))
@pytest.mark.parametrize("dw_bias,pw_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_fused_forward_matches_float64(case, dw_bias, pw_bias):
    shape, ks, strides, dil, pads, mult, c_out = case
    ops = _operands(shape, ks, mult, c_out, dw_bias, pw_bias)
    f32 = [None if a is None else jnp.asarray(a, jnp.float32) for a in ops]
    f = _fn(strides, dil, pads)
    assert SEP_TARGET in _lowered(f, *f32), "the fused kernel did not run"
    got = jax.jit(f)(*f32)
    with x64_enabled():
        ref = jax.jit(_fn(strides, dil, pads, impl="xla"))(*[None if a is None else jnp.asarray(a) for a in ops])
        ref = np.asarray(ref)
    assert got.dtype == jnp.float32
    assert _rel_err(got, ref) < TOL


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "x" + "x".join(map(str, c[0])))
def test_gradients_match_the_unfused_pair(case, monkeypatch):
    shape, ks, strides, dil, pads, mult, c_out = case
    args = [jnp.asarray(a, jnp.float32) for a in _operands(shape, ks, mult, c_out, True, True, seed=1)]
    f = _fn(strides, dil, pads)

    def loss(*a):
        return jnp.sum(jnp.sin(f(*a)))

    grads = jax.jit(jax.grad(loss, argnums=range(5)))(*args)
    monkeypatch.setattr(separable, "FUSED_FORWARD", False)
    assert SEP_TARGET not in _lowered(f, *args)
    ref = jax.jit(jax.grad(loss, argnums=range(5)))(*args)
    for name, g, r in zip(("x", "wd", "wp", "bd", "bp"), grads, ref, strict=True):
        assert _rel_err(g, r) < TOL, name


def test_only_float32_native_calls_fuse():
    shape, ks, strides, dil, pads, mult, c_out = CASES[0]
    args = [jnp.asarray(a, jnp.float32) for a in _operands(shape, ks, mult, c_out, True, True)]
    assert SEP_TARGET in _lowered(_fn(strides, dil, pads, impl="native"), *args)
    for impl in ("xla", "shift"):
        assert SEP_TARGET not in _lowered(_fn(strides, dil, pads, impl=impl), *args), impl
    bf16 = [a.astype(jnp.bfloat16) for a in args]
    assert SEP_TARGET not in _lowered(_fn(strides, dil, pads), *bf16)
    small = [args[0][:1, :8, :8], *args[1:]]  # 64 rows: below the native GEMM's minimum
    assert SEP_TARGET not in _lowered(_fn(strides, dil, pads), *small)


def test_separable_conv_module_fuses_only_the_plain_pair():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 8)), jnp.float32)
    plain = jaxdsc.SeparableConv(8, 24, 3, kernel_dilation=2, rngs=nnx.Rngs(0))
    ref = jaxdsc.SeparableConv(8, 24, 3, kernel_dilation=2, impl="xla", rngs=nnx.Rngs(0))
    assert SEP_TARGET in _lowered(lambda x: plain(x), x)
    assert _rel_err(plain(x), ref(x)) < TOL
    for kwargs in ({"mid_activation": "relu"}, {"mid_norm": "batch"}, {"merge": "concat"}):
        m = jaxdsc.SeparableConv(8, 24, 3, rngs=nnx.Rngs(0), **kwargs)
        m.eval()  # no BatchNorm statistics update inside the jax.jit trace
        assert SEP_TARGET not in _lowered(lambda x, m=m: m(x), x), kwargs


def test_bad_operands_name_the_argument():
    x = jnp.zeros((4, 32, 32, 8))
    wd = jnp.zeros((3, 3, 1, 8))
    kw = dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
    with pytest.raises(ValueError, match=r"pw_kernel must be \(8, C_out\)"):
        separable_conv(x, wd, jnp.zeros((7, 4)), **kw)
    with pytest.raises(ValueError, match=r"dw_bias must have shape \(8,\)"):
        separable_conv(x, wd, jnp.zeros((8, 4)), jnp.zeros(4), **kw)
    with pytest.raises(ValueError, match=r"pw_bias must have shape \(4,\)"):
        separable_conv(x, wd, jnp.zeros((8, 4)), None, jnp.zeros(8), **kw)


@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set(isa):
    with native_isa(isa):
        for case in (CASES[1], CASES[2]):
            test_fused_forward_matches_float64(case, True, True)
