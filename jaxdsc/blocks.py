"""Blocks: conv + BatchNorm + activation units (Flax NNX, channels-last)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.activations import check_activation
from jaxdsc.conv import Conv, DepthwiseConv, IntOrTuple, PointwiseConv
from jaxdsc.norm import BatchNorm
from jaxdsc.ops._select import IMPL_TABLE, op_impl
from jaxdsc.padding import PaddingLike
from jaxdsc.se import SqueezeExcite, se_features


class SeparableBlock(nnx.Module):
    """``depthwise -> BN -> act [-> SE] -> pointwise -> BN -> act`` (+ input if ``residual``).

    The convs have no bias (each BN's shift replaces it). Train/eval behaviour
    of the BatchNorms follows ``module.train()`` / ``module.eval()``.

    Args:
      residual: add the input to the output. Requires ``in_features ==
        out_features`` and unit strides; an input whose spatial size the block
        changes (e.g. ``"VALID"`` padding) raises at call time.
      se_ratio: squeeze-and-excitation (:class:`jaxdsc.SqueezeExcite`: ReLU
        inside, sigmoid gate) after the depthwise conv, timm's
        ``DepthwiseSeparableConv`` placement, with ``round(se_ratio *
        in_features * depth_multiplier)`` squeeze channels; ``0``: none.
      momentum, epsilon: BatchNorm settings (Flax momentum convention).
      impl: for every op of the block (:data:`jaxdsc.ops.IMPL_TABLE`), or a
        depthwise implementation name (the other ops then ``"auto"``).

    Shapes: ``(N, *spatial, in_features) -> (N, *out_spatial, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: IntOrTuple,
        *,
        strides: IntOrTuple = 1,
        kernel_dilation: IntOrTuple = 1,
        depth_multiplier: int = 1,
        padding: PaddingLike = "SAME",
        activation: str | None = "relu",
        residual: bool = False,
        se_ratio: float = 0.0,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.activation = check_activation("activation", activation)
        self.residual = _checks.boolean("residual", residual)
        self.se_ratio = _checks.number("se_ratio", se_ratio, low=0.0, high=1.0)
        self.depthwise = DepthwiseConv(
            in_features, kernel_size, depth_multiplier=depth_multiplier, strides=strides,
            padding=padding, kernel_dilation=kernel_dilation, use_bias=False, dtype=dtype,
            param_dtype=param_dtype, precision=precision, impl=impl, rngs=rngs,
        )
        dw = self.depthwise
        self.in_features, self.out_features = dw.in_features, _checks.positive_int("out_features", out_features)
        self.kernel_size, self.strides, self.kernel_dilation = dw.kernel_size, dw.strides, dw.kernel_dilation
        self.padding, self.depth_multiplier, self.impl = dw.padding, dw.depth_multiplier, impl
        if residual and (self.in_features != self.out_features or any(s != 1 for s in self.strides)):
            raise ValueError(
                "residual=True needs in_features == out_features and strides of 1, got "
                f"in_features={self.in_features}, out_features={self.out_features}, strides={self.strides}"
            )
        bn = dict(momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                  impl=op_impl("batchnorm", impl))
        self.bn_dw = BatchNorm(dw.out_features, **bn)
        self.se = SqueezeExcite(
            dw.out_features, se_features(dw.out_features, self.se_ratio), activation="relu",
            num_spatial_dims=len(self.kernel_size), dtype=dtype, param_dtype=param_dtype, precision=precision,
            impl=impl, rngs=rngs,
        ) if self.se_ratio else None
        self.pointwise = PointwiseConv(
            dw.out_features, out_features, use_bias=False, num_spatial_dims=len(self.kernel_size),
            dtype=dtype, param_dtype=param_dtype, precision=precision,
            impl=op_impl("pointwise", impl), rngs=rngs,
        )
        self.bn_pw = BatchNorm(self.out_features, **bn)
        self.momentum, self.epsilon = self.bn_dw.momentum, self.bn_dw.epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn_dw(self.depthwise(x), activation=self.activation)
        if self.se is not None:
            h = self.se(h)
        y = self.bn_pw(self.pointwise(h), activation=self.activation)
        if self.residual:
            if y.shape != x.shape:
                raise ValueError(
                    f"residual=True needs the block to keep the input shape, got input {x.shape} "
                    f"and output {y.shape} (padding={self.padding!r})"
                )
            y = y + x.astype(y.dtype)
        return y


class ConvBlock(nnx.Module):
    """``conv -> BN -> act``: a dense conv unit, e.g. a network stem.

    ``impl``: for both ops (:data:`jaxdsc.ops.IMPL_TABLE`) or a dense conv name.

    Shapes: ``(N, *spatial, in_features) -> (N, *out_spatial, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: IntOrTuple,
        *,
        strides: IntOrTuple = 1,
        kernel_dilation: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        activation: str | None = "relu",
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.activation = check_activation("activation", activation)
        self.conv = Conv(
            in_features, out_features, kernel_size, strides=strides, padding=padding,
            kernel_dilation=kernel_dilation, use_bias=False, dtype=dtype,
            param_dtype=param_dtype, precision=precision, impl=op_impl("dense", impl), rngs=rngs,
        )
        self.impl = impl
        c = self.conv
        self.in_features, self.out_features = c.in_features, c.out_features
        self.kernel_size, self.strides, self.kernel_dilation = c.kernel_size, c.strides, c.kernel_dilation
        self.padding = c.padding
        self.bn = BatchNorm(self.out_features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                            param_dtype=param_dtype,
                            impl=op_impl("batchnorm", impl) if impl in IMPL_TABLE else "auto")
        self.momentum, self.epsilon = self.bn.momentum, self.bn.epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x), activation=self.activation)
