"""Normalisation layers that match PyTorch exactly.

``BatchNorm`` differs from ``flax.nnx.BatchNorm`` in two deliberate ways, both
so that a JAX model and its PyTorch twin compute the same function in train
mode *and* keep the same running statistics:

* the running variance is updated with the **unbiased** batch variance
  (``var * n / (n - 1)``), as ``torch.nn.BatchNorm*d`` does; normalisation
  uses the biased variance in both. ``flax.nnx.BatchNorm`` updates with the
  biased variance, so after one step its ``var`` differs from torch's by the
  factor ``(n - 1) / n`` of the new-statistics term.
* it counts ``num_batches_tracked`` like torch, so checkpoints round-trip
  bit-exactly.

``momentum`` uses the Flax convention: ``running = momentum * running +
(1 - momentum) * batch``. Flax 0.9 equals torch ``momentum=0.1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype, check_float_input


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm over all but the last axis of ``x`` ``(N, *spatial, C)``.

    Returns ``(y, mean, var)``: ``y = (x - mean) * rsqrt(var + epsilon) * scale
    + bias`` with the batch mean and biased variance (two-pass variance: as
    accurate as torch's Welford for float32 activations). The backward is the
    closed form: two reductions and one elementwise pass over the activations,
    where autodiff of the forward takes several more; batch norm was the
    largest part of the CPU training step (issue 5, BENCHMARKS.md).
    """
    return _bn_train_fwd(x, scale, bias, epsilon)[0]


def _bn_train_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(epsilon, res, cotangents):
    del epsilon
    x, mean, rstd, scale = res
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    xhat = (x - mean) * rstd
    dbias = jnp.sum(g, axis=axes)
    dscale = jnp.sum(g * xhat, axis=axes)
    # dx = a * g + b + c * xhat, per-channel a, b, c: the y term
    # scale * rstd * (g - mean(g) - xhat * mean(g * xhat)), plus the mean and
    # var outputs' own terms (zero when they are only running statistics).
    a = scale * rstd
    b = (g_mean - a * dbias) / n
    c = (2 * g_var / rstd - a * dscale) / n
    dx = a * g + b + c * xhat
    return dx, dscale, dbias


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class Constant(nnx.Variable):
    """A fixed, non-trainable array that is part of the model (a PyTorch buffer)."""


class BatchNorm(nnx.Module):
    """Batch normalisation over the last (channel) axis of ``(N, *spatial, C)`` inputs.

    Args:
      num_features: channel count ``C``.
      momentum: Flax convention (0.9 == torch 0.1).
      epsilon: added to the variance.
      use_running_average: normalise with the running statistics (eval mode).
        ``module.eval()`` / ``module.train()`` set it.
      dtype: compute dtype of the output (statistics are computed in float32, or in
        float64 for float64 inputs).
      param_dtype: dtype of scale, bias and the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic initialisation; accepted for a uniform signature
        self.num_features = _checks.positive_int("num_features", num_features)
        self.momentum = _checks.number("momentum", momentum, low=0.0, high=1.0)
        self.epsilon = _checks.number("epsilon", epsilon, low=0.0, high=math.inf, low_open=True)
        self.use_running_average = _checks.boolean("use_running_average", use_running_average)
        self.dtype = dtype
        self.param_dtype = param_dtype
        c = self.num_features
        self.scale = nnx.Param(jnp.ones((c,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((c,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((c,), param_dtype))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        """Normalise ``x`` of shape ``(N, *spatial, C)``; in train mode also update the statistics."""
        check_float_input(x)
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            raise ValueError(
                f"x must have shape (N, ..., {self.num_features}) (channels last), got {x.shape}"
            )
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        # float32 statistics for low-precision inputs, but never below the input's
        # precision: float64 inputs must match torch's float64 batch norm.
        cdtype = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(cdtype)
        if use_ra:
            mean = self.mean[...].astype(cdtype)
            var = self.var[...].astype(cdtype)
        else:
            n = math.prod(x.shape[:-1])
            if n < 2:
                raise ValueError(
                    f"BatchNorm in train mode needs more than 1 value per channel, got input shape {x.shape}"
                )
            scale, bias = self.scale[...].astype(cdtype), self.bias[...].astype(cdtype)
            y, mean, var = batch_norm_train(xf, scale, bias, self.epsilon)
            m = self.momentum
            unbiased = var * (n / (n - 1))
            update = jax.lax.stop_gradient
            self.mean[...] = update(m * self.mean[...] + (1 - m) * mean).astype(self.param_dtype)
            self.var[...] = update(m * self.var[...] + (1 - m) * unbiased).astype(self.param_dtype)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
            return y.astype(self.dtype or x.dtype)
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(cdtype)
        y = (xf - mean) * inv + self.bias[...].astype(cdtype)
        return y.astype(self.dtype or x.dtype)


class Normalize(nnx.Module):
    """Fixed per-channel standardisation ``(x - mean) / std`` over the last axis.

    The statistics are :class:`Constant` variables: saved with the model,
    never trained, and exported to PyTorch as buffers, so an exported model
    takes raw ``[0, 1]`` images on both sides. ``param_dtype`` is their dtype
    (a float64 or bfloat16 model keeps one float dtype throughout, as a
    PyTorch ``model.double()`` / ``.bfloat16()`` does).
    """

    def __init__(
        self,
        num_features: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        param_dtype: Dtype = jnp.float32,
    ):
        self.num_features = c = _checks.positive_int("num_features", num_features)
        mean = [0.0] * c if mean is None else list(mean)
        std = [1.0] * c if std is None else list(std)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) != c:
                raise ValueError(f"{name} must have num_features={c} entries, got {len(values)}")
        for i, s in enumerate(std):
            _checks.number(f"std[{i}]", s, low=0.0, high=math.inf, low_open=True)
        self.mean = Constant(jnp.asarray(mean, param_dtype))
        self.std = Constant(jnp.asarray(std, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        check_float_input(x)
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            hint = ""
            if x.ndim >= 3 and x.shape[1] == self.num_features:
                hint = "; it looks like channels-first (NCHW) input, this layer expects NHWC"
            raise ValueError(
                f"x must have {self.num_features} channels on its last axis (NHWC), "
                f"got shape {x.shape}{hint}"
            )
        return ((x - self.mean[...]) / self.std[...]).astype(x.dtype)
