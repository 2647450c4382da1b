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

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype, check_float_input
from jaxdsc.activations import apply_activation, check_activation
from jaxdsc.ops._select import check_impl, op_impl
from jaxdsc.ops.batchnorm import BN_IMPLS, batch_norm_act_train, batch_norm_train

__all__ = ["BatchNorm", "Constant", "Normalize", "batch_norm_train"]


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
      impl: train-mode kernels, ``"auto"``, ``"xla"`` or ``"native"``
        (:mod:`jaxdsc.ops.batchnorm`; ``"auto"``: native on CPU for float32), or a
        key of :data:`jaxdsc.ops.IMPL_TABLE` (``"shift"`` means ``"xla"`` here).
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
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic initialisation; accepted for a uniform signature
        self.impl = check_impl("batchnorm", impl, BN_IMPLS)
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

    def __call__(
        self,
        x: jax.Array,
        *,
        use_running_average: bool | None = None,
        activation: str | None = None,
    ) -> jax.Array:
        """Normalise ``x`` of shape ``(N, *spatial, C)``; in train mode also update the statistics.

        ``activation`` (a name of :mod:`jaxdsc.activations`) is applied to the
        result; ``"relu"`` is fused into the native train-mode kernels.
        """
        check_float_input(x)
        check_activation("activation", activation)
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
            fuse = activation == "relu"
            y, mean, var = batch_norm_act_train(
                xf, scale, bias, self.epsilon, relu=fuse, impl=op_impl("batchnorm", self.impl)
            )
            m = self.momentum
            unbiased = var * (n / (n - 1))
            update = jax.lax.stop_gradient
            self.mean[...] = update(m * self.mean[...] + (1 - m) * mean).astype(self.param_dtype)
            self.var[...] = update(m * self.var[...] + (1 - m) * unbiased).astype(self.param_dtype)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
            # Other activations after the cast, as the unfused layers had them.
            y = y.astype(self.dtype or x.dtype)
            return y if fuse else apply_activation(activation, y)
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(cdtype)
        y = (xf - mean) * inv + self.bias[...].astype(cdtype)
        return apply_activation(activation, y.astype(self.dtype or x.dtype))


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
