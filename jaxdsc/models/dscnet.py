"""DSCNet: a small CIFAR classifier built from depthwise-separable dilated blocks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.activations import check_activation
from jaxdsc.blocks import ConvBlock, SeparableBlock
from jaxdsc.models._registry import register_model
from jaxdsc.norm import Normalize

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class BlockSpec(NamedTuple):
    in_features: int
    out_features: int
    stride: int
    dilation: int


def block_plan(width: int, depth: int, dilations: tuple[int, ...] = (2, 4)) -> list[BlockSpec]:
    """The separable blocks of :class:`DSCNet` (shared with its PyTorch twin).

    Three stages of ``depth`` blocks, widths ``w, 2w, 4w``:

    1. full resolution, dilation 1;
    2. the first block halves the resolution (stride 2), the rest use dilation 1
       then ``dilations[0]``, alternating;
    3. *no* further downsampling: the stage keeps the resolution and grows the
       receptive field with ``dilations`` instead (DRN style), so a 32x32 input
       ends at 16x16 with every block seeing a wide context.
    """
    w = width
    plan = [BlockSpec(w, w, 1, 1) for _ in range(depth)]
    plan += [BlockSpec(w if i == 0 else 2 * w, 2 * w, 2 if i == 0 else 1, (1, dilations[0])[i % 2])
             for i in range(depth)]
    plan += [BlockSpec(2 * w if i == 0 else 4 * w, 4 * w, 1, dilations[i % len(dilations)])
             for i in range(depth)]
    return plan


class DSCNet(nnx.Module):
    """Image classifier: normalise -> conv stem -> separable dilated blocks -> pool -> linear.

    Takes images as a PyTorch user has them after ``ToTensor()``: float in
    ``[0, 1]``, here channels-last ``(N, H, W, C)``; normalisation with fixed
    per-channel statistics is part of the model (``normalize``), so an
    exported model needs no preprocessing knowledge.

    Args:
      num_classes: output logits.
      in_features: image channels.
      width: channels of the first stage (then ``2w`` and ``4w``).
      depth: separable blocks per stage (3 stages, see :func:`block_plan`).
      activation: activation name used throughout.
      momentum, epsilon: BatchNorm settings (Flax momentum convention).
      impl: ``"auto"``, ``"xla"``, ``"shift"`` or ``"native"``, for every op
        (stem, depthwise, pointwise, BatchNorm; :data:`jaxdsc.ops.IMPL_TABLE`).

    Returns logits ``(N, num_classes)``. Blocks whose input and output shapes
    agree are residual.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_features: int = 3,
        width: int = 32,
        depth: int = 2,
        activation: str = "relu",
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_features = _checks.positive_int("in_features", in_features)
        self.width = _checks.positive_int("width", width)
        self.depth = _checks.positive_int("depth", depth)
        self.activation = check_activation("activation", activation)
        self.momentum, self.epsilon = momentum, epsilon
        self.dtype, self.impl = dtype, impl
        common = dict(activation=activation, momentum=momentum, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, precision=precision, rngs=rngs)
        if in_features == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = (0.5,) * in_features, (0.5,) * in_features
        self.normalize = Normalize(in_features, mean, std, param_dtype=param_dtype)
        self.stem = ConvBlock(in_features, width, 3, impl=impl, **common)
        self.blocks = nnx.List([
            SeparableBlock(
                b.in_features, b.out_features, 3, strides=b.stride, kernel_dilation=b.dilation,
                residual=b.in_features == b.out_features and b.stride == 1, impl=impl, **common,
            )
            for b in block_plan(width, depth)
        ])
        self.head = nnx.Linear(4 * width, num_classes, param_dtype=param_dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled features ``(N, 4 * width)`` in float32 (float64 for float64 activations)."""
        h = self.stem(self.normalize(x))
        for block in self.blocks:
            h = block(h)
        # Pool low-precision activations in float32, but never drop float64 to float32.
        acc = jnp.promote_types(h.dtype, jnp.float32)
        return jnp.mean(h.astype(acc), axis=tuple(range(1, h.ndim - 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``(N, H, W, C)`` in ``[0, 1]``.

        float32, or float64 for a float64 model and input.
        """
        feats = self.features(x)
        return self.head(feats).astype(feats.dtype)


@register_model("jaxdsc:dscnet")
def dscnet(*, rngs: nnx.Rngs, **kwargs) -> DSCNet:
    """:class:`DSCNet` with its constructor's keyword arguments."""
    return DSCNet(rngs=rngs, **kwargs)
