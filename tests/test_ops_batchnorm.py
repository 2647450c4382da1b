"""Train-mode batch norm (+ fused ReLU): every implementation against a float64 reference.

``(y, mean, var) = batch_norm_act_train(x, scale, bias, eps, relu=...)`` and its
VJP with non-zero cotangents on all three outputs (the running-statistics
outputs are usually stop-gradient'ed, but the op must still be right), for
shapes around the native kernels' vector width and chunking (C = 1..67,
M = 2..1000 rows), second-order gradients, NaN propagation, determinism,
every instruction set, the streamed (>= 8 MiB) path, ``"auto"`` selection and
the ``BatchNorm`` module's ``impl`` / ``activation`` arguments.

Tolerance (float32 against float64): 1e-5 relative to the largest reference
magnitude, for the sums (mean, dscale, dbias) relative to the largest sum of
absolute terms (a mean near zero has no relative accuracy to ask for). Means and variances are sums of up to 1000 values (native: chunked
two-pass merged in double; XLA: two-pass); observed errors are below 1e-6.
With a mean 50 standard deviations from zero (``offset``), float32 ``x - mean``
alone is off by ulp(100) / std = 4e-6 relative, and the gradient sums cancel
(dscale: 1.6e-5 for both implementations): 1e-4 there. A few rows can have a
per-channel std far below the data's magnitude, and then no float32
implementation does better than that conditioning allows: the tolerance is
widened to 16 float32 ulps of max|x| / min std (observed: 4 ulps, e.g. 3 rows
at offset 100 with a smallest std of 0.1: 2.3e-4 for both implementations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ISAS, native_isa
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdsc
from jaxdsc.ops import native
from jaxdsc.ops.batchnorm import (
    BN_IMPLS,
    NATIVE_MIN_ELEMENTS,
    batch_norm_act_train,
    select_batch_norm_impl,
)

IMPLS = [i for i in BN_IMPLS if i != "native" or native.available("batchnorm")]
needs_native = pytest.mark.skipif(
    not native.available("batchnorm"),
    reason=f"native batch norm unavailable: {native.unavailable_reason() or 'old build or failed self-check'}",
)
RTOL = 1e-5
EPS = 1e-3


def _reference(x, scale, bias, gy, g_mean, g_var, relu):
    """Outputs and VJP in float64 numpy, by autodiff-free formulas."""
    x, scale, bias, gy, g_mean, g_var = (np.asarray(a, np.float64) for a in (x, scale, bias, gy, g_mean, g_var))
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gy.reshape(x2.shape)
    n = x2.shape[0]
    mean, var = x2.mean(0), x2.var(0)
    rstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x2 - mean) * rstd
    z = xhat * scale + bias
    y = np.maximum(z, 0.0) if relu else z
    dz = np.where(z > 0, g2, 0.0) if relu else g2
    dbias = dz.sum(0)
    dscale = (dz * xhat).sum(0)
    dx = scale * rstd * (dz - dbias / n - xhat * dscale / n) + g_mean / n + g_var * 2 * (x2 - mean) / n
    return y.reshape(x.shape), mean, var, dx.reshape(x.shape), dscale, dbias


def _scales(x, gy, ref):
    """Error scale per output: magnitude, or for the sums the sum of absolute terms."""
    x2 = np.abs(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])
    g2 = np.abs(np.asarray(gy, np.float64)).reshape(x2.shape)
    xhat = np.abs(np.asarray(x, np.float64).reshape(x2.shape) - ref[1]) / np.sqrt(ref[2] + EPS)
    return (None, x2.mean(0).max(), None, None, (g2 * xhat).sum(0).max(), g2.sum(0).max())


def _check_all(got, ops, relu, what, rtol=None):
    ref = _reference(*ops, relu)
    for name, g, r, sc in zip(("y", "mean", "var", "dx", "dscale", "dbias"), got, ref,
                              _scales(ops[0], ops[3], ref), strict=True):
        _close(g, r, f"{what} {name}", RTOL if rtol is None else rtol, sc)


def _run(impl, x, scale, bias, gy, g_mean, g_var, relu):
    f = jax.jit(lambda x, s, b: batch_norm_act_train(x, s, b, EPS, relu=relu, impl=impl))
    out, vjp = jax.vjp(f, x, scale, bias)
    return (*out, *vjp((gy, g_mean, g_var)))


def _close(got, ref, what, rtol=RTOL, scale=None):
    got, ref = np.asarray(got, np.float64), np.asarray(ref)
    scale = np.max(np.abs(ref)) if scale is None else scale
    err = np.max(np.abs(got - ref)) / max(scale, 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol}"


def _operands(shape, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    # A non-zero mean (offset) checks the variance for cancellation.
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(np.float32)
    scale, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    gy = rng.standard_normal(shape).astype(np.float32)
    g_mean, g_var = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    return x, scale, bias, gy, g_mean, g_var


def _rtol(x, floor):
    """``floor``, or 16 float32 ulps of the data's conditioning max|x| / min per-channel std."""
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    cond = np.abs(x2).max() / np.sqrt(x2.var(0) + EPS).min()
    return max(floor, 16 * float(np.finfo(np.float32).eps) * cond)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    rows=st.integers(2, 1000),
    c=st.sampled_from([1, 3, 15, 16, 17, 32, 47, 67]),
    relu=st.booleans(),
    offset=st.sampled_from([0.0, 100.0]),
)
def test_matches_float64_reference(impl, rows, c, relu, offset):
    ops = _operands((rows, c), seed=rows * 100 + c, offset=offset)
    _check_all(_run(impl, *ops, relu), ops, relu, impl, _rtol(ops[0], RTOL if offset == 0.0 else 1e-4))


@pytest.mark.parametrize("impl", IMPLS)
def test_few_rows_far_from_zero(impl):
    """3 rows at offset 100 (smallest std 0.1): an ill-conditioned case CI once drew at random."""
    ops = _operands((3, 47), seed=3 * 100 + 47, offset=100.0)
    _check_all(_run(impl, *ops, False), ops, False, impl, _rtol(ops[0], 1e-4))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(4, 7, 5, 33), (2, 3, 3, 4, 16), (6, 9, 40)])
def test_ranks(impl, shape):
    ops = _operands(shape, seed=len(shape))
    _check_all(_run(impl, *ops, True), ops, True, f"{impl} {shape}")


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    ops = _operands((300, 37), seed=7)
    with native_isa(isa):
        got = _run("native", *ops, True)
    _check_all(got, ops, True, isa)


@needs_native
def test_streamed_outputs():
    """y and dx of 8 MiB and more are written with non-temporal stores."""
    ops = _operands((65536, 64), seed=3)  # 16 MiB
    _check_all(_run("native", *ops, True), ops, True, "streamed")


@needs_native
def test_deterministic():
    ops = _operands((5000, 48), seed=5)
    a = [np.asarray(v) for v in _run("native", *ops, True)]
    b = [np.asarray(v) for v in _run("native", *ops, True)]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates_through_relu(impl):
    x, scale, bias, *_ = _operands((64, 16), seed=1)
    x[3, 5] = np.nan
    y, mean, _ = batch_norm_act_train(x, scale, bias, EPS, relu=True, impl=impl)
    # A NaN poisons its channel's statistics and so the whole channel, as in torch.
    assert np.isnan(np.asarray(y)[:, 5]).all() and np.isnan(np.asarray(mean)[5])
    assert not np.isnan(np.asarray(y)[:, [4, 6]]).any()


@needs_native
def test_second_order_matches_xla():
    x, scale, bias, *_ = _operands((200, 19), seed=11)

    def hvp(impl):
        def loss(x):
            y, mean, var = batch_norm_act_train(x, scale, bias, EPS, relu=True, impl=impl)
            return jnp.sum(y**3) + jnp.sum(mean * var)

        grad = jax.grad(loss)
        # jitted: one compile of the whole program instead of eager dispatch of its many ops
        return jax.jit(lambda x: jax.jvp(grad, (x,), (jnp.ones_like(x),))[1])(x)

    _close(hvp("native"), np.asarray(hvp("xla"), np.float64), "hessian-vector product")


def test_select_impl():
    small = jnp.ones((4, 8), jnp.float32)
    vec = jnp.ones((8,), jnp.float32)
    assert select_batch_norm_impl(small, vec, vec, "auto") == "xla"  # below NATIVE_MIN_ELEMENTS
    assert select_batch_norm_impl(small, vec, vec, "xla") == "xla"
    big = jnp.ones((NATIVE_MIN_ELEMENTS // 8, 8), jnp.float32)
    want = "native" if native.available("batchnorm") else "xla"
    assert select_batch_norm_impl(big, vec, vec, "auto") == want
    big64 = big.astype(jnp.bfloat16)
    assert select_batch_norm_impl(big64, vec, vec, "auto") == "xla"
    with pytest.raises(ValueError, match=r"impl=.native. needs .* got x bfloat16"):
        select_batch_norm_impl(big64, vec, vec, "native")
    with pytest.raises(ValueError, match=r"impl must be .auto. or one of .* got .cuda."):
        select_batch_norm_impl(big, vec, vec, "cuda")
    with pytest.raises(ValueError, match=r"scale and bias of shape \(C,\), got x \(4, 8\), scale \(3,\)"):
        batch_norm_act_train(small, jnp.ones(3), vec, EPS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_module_activation_and_impl(impl, activation):
    """``BatchNorm(impl=...)(x, activation=a)`` equals ``a(BatchNorm()(x))``, statistics too."""
    x = jnp.asarray(_operands((8, 9, 9, 24), seed=2)[0])
    fused = jaxdsc.BatchNorm(24, impl=impl)
    plain = jaxdsc.BatchNorm(24, impl="xla")
    y = fused(x, activation=activation)
    ref = plain(x)
    ref = ref if activation is None else jaxdsc.activations.ACTIVATIONS[activation](ref)
    _close(y, np.asarray(ref, np.float64), "train output")
    for name in ("mean", "var"):
        _close(getattr(fused, name)[...], np.asarray(getattr(plain, name)[...], np.float64), name)
    fused.eval(), plain.eval()
    ref = plain(x)
    ref = ref if activation is None else jaxdsc.activations.ACTIVATIONS[activation](ref)
    _close(fused(x, activation=activation), np.asarray(ref, np.float64), "eval output")


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"impl must be .auto. or one of .* got .fast."):
        jaxdsc.BatchNorm(4, impl="fast")
    with pytest.raises(ValueError, match="activation must be one of"):
        jaxdsc.BatchNorm(4)(jnp.ones((2, 4)), activation="swish2")


@pytest.mark.skipif(not native.available(), reason="native library not built or not loadable")
def test_native_kernels_pass_their_self_check():
    """A built library whose batch-norm kernels fail the load-time self-check would
    only make the native tests above skip; this fails instead."""
    assert native.available("batchnorm")
