"""Squeeze-and-excitation: per-channel gates computed from the global mean (Hu et al., 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.activations import apply_activation, check_activation
from jaxdsc.conv import PointwiseConv
from jaxdsc.ops._select import op_impl


def se_features(features: int, ratio: float) -> int:
    """Channels of the squeeze for ``ratio`` of ``features`` (at least 1), shared with the PyTorch twin."""
    return max(1, round(features * ratio))


class SqueezeExcite(nnx.Module):
    """``x * gate(expand(act(reduce(mean(x)))))``: channel attention, as in MobileNetV3 / EfficientNet.

    ``reduce`` and ``expand`` are biased pointwise convs on the spatially
    pooled input (a 1x1 map), the layout timm's and torchvision's SE modules use.

    Args:
      in_features: channels of the input (and of the gates).
      rd_features: channels of the squeeze.
      activation: between ``reduce`` and ``expand``.
      gate: squashes the gates (``"sigmoid"``; MobileNetV3 uses ``"hard_sigmoid"``).
      num_spatial_dims: spatial rank of the input (1, 2 or 3).
      impl: of the two pointwise convs (:data:`jaxdsc.ops.IMPL_TABLE`).

    Shapes: ``(N, *spatial, in_features) -> (N, *spatial, in_features)``.
    """

    def __init__(
        self,
        in_features: int,
        rd_features: int,
        *,
        activation: str = "relu",
        gate: str = "sigmoid",
        num_spatial_dims: int = 2,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.rd_features = _checks.positive_int("rd_features", rd_features)
        self.activation = check_activation("activation", activation)
        self.gate = check_activation("gate", gate)
        common = dict(use_bias=True, num_spatial_dims=num_spatial_dims, dtype=dtype, param_dtype=param_dtype,
                      precision=precision, impl=op_impl("pointwise", impl), rngs=rngs)
        self.reduce = PointwiseConv(self.in_features, self.rd_features, **common)
        self.expand = PointwiseConv(self.rd_features, self.in_features, **common)
        self.num_spatial_dims = self.reduce.num_spatial_dims

    def __call__(self, x: jax.Array) -> jax.Array:
        _checks.input_layout(x.shape, rank=self.num_spatial_dims, channels=self.in_features, channels_last=True)
        # The mean in float32 at least: a bfloat16 sum over a feature map loses the gates' precision.
        acc = jnp.promote_types(x.dtype, jnp.float32)
        s = jnp.mean(x.astype(acc), axis=tuple(range(1, x.ndim - 1)), keepdims=True).astype(x.dtype)
        s = self.expand(apply_activation(self.activation, self.reduce(s)))
        return x * apply_activation(self.gate, s).astype(x.dtype)
