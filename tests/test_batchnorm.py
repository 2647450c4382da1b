"""jaxdsc.BatchNorm: PyTorch's statistics, Flax's momentum convention, train/eval switching.

* momentum: Flax convention, ``running = m * running + (1 - m) * batch``;
  Flax 0.9 == torch 0.1 (the conversion table flips it);
* running variance updated with the *unbiased* batch variance, like torch;
  ``flax.nnx.BatchNorm`` uses the biased one, so after one step from
  ``var = 1`` the new-statistics terms differ by the factor ``n / (n - 1)``;
* ``num_batches_tracked`` counts train steps, like torch;
* train/eval via ``.train()`` / ``.eval()``, ``nnx.view`` and the call-time
  ``use_running_average`` override.

Tolerances: statistics are means over ``n`` values; float32 summation-order
differences stay below 1e-6 relative (checked at ``RTOL32 = 1e-5``), float64
at ``RTOL64`` (see conftest.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    RTOL32,
    RTOL64,
    assert_close,
    jax_call,
    random_input,
    to_nchw,
    to_nhwc,
    x64_enabled,
)
from flax import nnx

import jaxdsc
import torch_bridge
from torch_bridge import nn as tnn


def batches(shape: tuple[int, ...], steps: int, dtype=np.float32) -> list[np.ndarray]:
    """Batches with different means and scales per step and channel, so statistics move."""
    c = shape[-1]
    return [(random_input(shape, dtype, seed=s) * (1 + s + np.arange(c)) + s - np.arange(c)).astype(dtype)
            for s in range(steps)]


def stats(bn: jaxdsc.BatchNorm) -> tuple[np.ndarray, np.ndarray, int]:
    return np.asarray(bn.mean[...]), np.asarray(bn.var[...]), int(bn.num_batches_tracked[...])


@pytest.mark.parametrize(("jax_momentum", "torch_momentum"), [(0.9, 0.1), (0.99, 0.01), (0.0, 1.0), (1.0, 0.0)])
def test_momentum_convention(jax_momentum, torch_momentum):
    bn = jaxdsc.BatchNorm(3, momentum=jax_momentum)
    twin = torch_bridge.to_torch(bn)
    assert twin.momentum == pytest.approx(torch_momentum, abs=1e-12)
    assert torch_bridge.from_torch(twin).momentum == pytest.approx(jax_momentum, abs=1e-12)
    assert jaxdsc.BatchNorm(3).momentum == 0.9 and tnn.BatchNorm(3).momentum == 0.1  # the defaults agree


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4), (2, 3, 4, 4), (2, 2, 3, 2, 4)], ids=lambda s: f"{len(s)}d")
def test_running_statistics_match_torch_after_n_steps(shape, dtype):
    with x64_enabled() if dtype == "float64" else _nullcontext():
        npdt = np.dtype(dtype)
        rtol = RTOL32 if dtype == "float32" else RTOL64
        bn = jaxdsc.BatchNorm(4, momentum=0.7, epsilon=1e-3, param_dtype=jnp.dtype(dtype))
        twin = torch_bridge.to_torch(bn)
        assert twin.momentum == pytest.approx(0.3) and twin.eps == 1e-3
        for i, x in enumerate(batches(shape, 5, npdt)):
            y = np.asarray(jax_call(bn, x))
            with torch.no_grad():
                yt = twin(torch.from_numpy(to_nchw(x) if x.ndim > 2 else x)).numpy()
            assert_close(y, to_nhwc(yt) if yt.ndim > 2 else yt, rtol, what=f"output at step {i}")
        mean, var, count = stats(bn)
        assert count == int(twin.num_batches_tracked) == 5
        assert_close(mean, twin.running_mean.numpy(), rtol, what="running mean")
        assert_close(var, twin.running_var.numpy(), rtol, what="running var")


def test_running_statistics_formula():
    """One step from (mean 0, var 1): Flax momentum, unbiased variance (numpy ddof=1)."""
    x = batches((4, 3, 5), 1)[0]
    bn = jaxdsc.BatchNorm(5, momentum=0.6)
    jax_call(bn, x)
    flat = x.reshape(-1, 5).astype(np.float64)
    mean, var, count = stats(bn)
    np.testing.assert_allclose(mean, 0.6 * 0 + 0.4 * flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, 0.6 * 1 + 0.4 * flat.var(0, ddof=1), rtol=1e-6)
    assert count == 1


def test_epsilon_is_used():
    """Small-variance channels (var ~ 1e-6, not far below epsilon): the output scale depends on
    epsilon, exactly through ``1 / sqrt(var + eps)``."""
    x = (1e-3 * random_input((8, 3))).astype(np.float32)
    for eps in (1e-5, 1e-1):
        bn = jaxdsc.BatchNorm(3, epsilon=eps)
        y = np.asarray(jax_call(bn, x))
        flat = x.astype(np.float64)
        expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + eps)
        np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-6)
    # The two epsilons give clearly different outputs (the test can fail).
    assert not np.allclose(np.asarray(jaxdsc.BatchNorm(3, epsilon=1e-5)(x)), np.asarray(jaxdsc.BatchNorm(3, epsilon=1e-1)(x)))


def test_documented_difference_to_flax_batchnorm():
    """Same outputs in train mode (both normalise with the biased variance), same running mean,
    and running variances whose new-statistics terms differ by n / (n - 1)."""
    x = batches((2, 3, 2, 4), 1)[0]
    n = 2 * 3 * 2
    m = 0.9
    ours = jaxdsc.BatchNorm(4, momentum=m)
    flax_bn = nnx.BatchNorm(4, momentum=m, epsilon=1e-5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), np.asarray(flax_bn(jnp.asarray(x))),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.mean[...]), np.asarray(flax_bn.mean[...]), rtol=1e-6)
    ours_new = np.asarray(ours.var[...], np.float64) - m * 1.0
    flax_new = np.asarray(flax_bn.var[...], np.float64) - m * 1.0
    np.testing.assert_allclose(ours_new / flax_new, n / (n - 1), rtol=1e-5)


def test_eval_uses_running_statistics_and_does_not_update():
    bn = jaxdsc.BatchNorm(3)
    for x in batches((4, 5, 3), 3):
        jax_call(bn, x)
    frozen = stats(bn)
    bn.eval()
    assert bn.use_running_average is True
    x = batches((2, 5, 3), 1)[0] * 10
    y = np.asarray(jax_call(bn, x))
    mean, var, count = frozen
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    after = stats(bn)
    assert after[2] == count == 3
    np.testing.assert_array_equal(after[0], mean)
    np.testing.assert_array_equal(after[1], var)
    bn.train()
    jax_call(bn, x)
    assert stats(bn)[2] == 4


def test_call_time_override():
    bn = jaxdsc.BatchNorm(3)
    x = jnp.asarray(batches((4, 3), 1)[0])
    y_eval = bn(x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert int(bn.num_batches_tracked[...]) == 0
    bn.eval()
    bn(x, use_running_average=False)
    assert int(bn.num_batches_tracked[...]) == 1


def test_nnx_view_switches_a_copy():
    block = jaxdsc.SeparableBlock(3, 3, 3, rngs=nnx.Rngs(0))
    jax_call(block, batches((2, 5, 5, 3), 1)[0])
    view = nnx.view(block, use_running_average=True)
    assert view.bn_dw.use_running_average and view.bn_pw.use_running_average
    assert not block.bn_dw.use_running_average and not block.bn_pw.use_running_average
    assert torch_bridge.to_torch(view).training is False
    assert torch_bridge.to_torch(block).training is True
    # The view shares the statistics: eval through it uses what training produced.
    x = batches((2, 5, 5, 3), 1)[0]
    block.eval()
    np.testing.assert_array_equal(np.asarray(view(jnp.asarray(x))), np.asarray(block(jnp.asarray(x))))


def test_train_eval_on_composites_reach_every_batchnorm():
    net = jaxdsc.SeparableConv(3, 4, 3, mid_norm="batch", rngs=nnx.Rngs(0))
    net.eval()
    assert net.norm.use_running_average
    net.train()
    assert not net.norm.use_running_average


def test_train_mode_needs_more_than_one_value_per_channel():
    for module in (jaxdsc.BatchNorm(3), torch_bridge.nn.BatchNorm(3)):
        x = np.ones((1, 1, 1, 3), np.float32)
        with pytest.raises(ValueError, match=r"more than 1 value per channel"):
            module(jnp.asarray(x)) if isinstance(module, nnx.Module) else module(torch.from_numpy(to_nchw(x)))


def test_float64_statistics_are_computed_in_float64():
    """Regression: statistics were always computed in float32, so float64 inputs with a large
    offset lost their variance (and float64 parity with torch was ~1e-7, not 1e-10)."""
    with x64_enabled():
        x = (1e4 + 1e-3 * random_input((64, 2), np.float64)).astype(np.float64)
        bn = jaxdsc.BatchNorm(2, momentum=0.0, param_dtype=jnp.float64)
        y = np.asarray(bn(jnp.asarray(x)))
        assert y.dtype == np.float64
        np.testing.assert_allclose(np.asarray(bn.var[...]), x.var(0, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-9, atol=1e-9)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("shape", [(6, 5, 3), (4, 3, 3, 7), (9, 2)])
def test_closed_form_backward_matches_autodiff(shape):
    """``batch_norm_train``'s hand-written VJP equals autodiff of the plain formula, for
    cotangents on all three outputs (y, mean, var), in float64 (agreement to rounding)."""
    import jax

    from jaxdsc.norm import batch_norm_train

    def plain(x, scale, bias):
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        return (x - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias, mean, var

    with x64_enabled():
        c = shape[-1]
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(size=shape) * 3 + 1)
        scale, bias = jnp.asarray(rng.normal(size=c)), jnp.asarray(rng.normal(size=c))
        cts = (jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=c)),
               jnp.asarray(rng.normal(size=c)))
        out, vjp = jax.vjp(lambda *a: batch_norm_train(*a, 1e-3), x, scale, bias)
        ref_out, ref_vjp = jax.vjp(plain, x, scale, bias)
        for got, want in zip(out, ref_out, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
        for got, want in zip(vjp(cts), ref_vjp(cts), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)
        # Second order goes through the closed form too (its backward is plain jnp).
        hvp = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(batch_norm_train(x, scale, bias, 1e-3)[0] ** 3))(x) ** 2))
        ref_hvp = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(plain(x, scale, bias)[0] ** 3))(x) ** 2))
        np.testing.assert_allclose(np.asarray(hvp(x)), np.asarray(ref_hvp(x)), rtol=1e-8, atol=1e-9)
