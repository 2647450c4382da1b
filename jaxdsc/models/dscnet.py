"""DSCNet: a small CIFAR classifier built from depthwise-separable dilated blocks."""

from __future__ import annotations

from collections.abc import Sequence
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


def block_plan(
    width: int | Sequence[int],
    depth: int | Sequence[int],
    dilations: Sequence[int] = (2, 4),
    strides: Sequence[int] = (1, 2, 1),
    stem_width: int | None = None,
) -> list[BlockSpec]:
    """The separable blocks of :class:`DSCNet` (shared with its PyTorch twin).

    Three stages of ``depth`` blocks (or ``depth[i]`` in stage ``i``); ``width``
    is the first stage's width (stages ``w, 2w, 4w``) or the three widths. The
    first block of stage ``i`` has stride ``strides[i]``; the first block of all
    takes ``stem_width`` channels (default: the first stage's width). Dilations:

    1. stage 1: 1;
    2. stage 2: 1 then ``dilations[0]``, alternating;
    3. stage 3: ``dilations`` in turn (a strided first block: 1). With the
       default strides ``(1, 2, 1)`` the stage keeps the resolution and grows
       the receptive field with dilation instead of downsampling (DRN style):
       a 32x32 input ends at 16x16 with every block seeing a wide context.
    """
    w1, w2, w3 = (width, 2 * width, 4 * width) if isinstance(width, int) else tuple(width)
    s1, s2, s3 = strides
    d1, d2, d3 = (depth,) * 3 if isinstance(depth, int) else tuple(depth)
    w0 = w1 if stem_width is None else stem_width
    plan = [BlockSpec(w0 if i == 0 else w1, w1, s1 if i == 0 else 1, 1) for i in range(d1)]
    plan += [BlockSpec(w1 if i == 0 else w2, w2, s2 if i == 0 else 1, (1, dilations[0])[i % 2])
             for i in range(d2)]
    plan += [BlockSpec(w2 if i == 0 else w3, w3, s3 if i == 0 else 1,
                       1 if i == 0 and s3 > 1 else dilations[i % len(dilations)])
             for i in range(d3)]
    return plan


def stage_config(width: int | None, widths: Sequence[int] | None, strides: Sequence[int],
                 dilations: Sequence[int]) -> tuple[int, tuple[int, int, int], tuple[int, int, int], tuple[int, ...]]:
    """Validated ``(width, widths, strides, dilations)`` of a DSCNet (and of its PyTorch twin)."""
    if widths is None:
        w = _checks.positive_int("width", 32 if width is None else width)
        widths = (w, 2 * w, 4 * w)
    else:
        widths = tuple(_checks.positive_int("widths", v) for v in widths)
        if len(widths) != 3:
            raise ValueError(f"widths must hold the 3 stage widths, got {widths}")
        if width is not None and width != widths[0]:
            raise ValueError(f"width={width} contradicts widths={widths} (width is the first stage's; pass one)")
    strides = tuple(_checks.positive_int("strides", v) for v in strides)
    if len(strides) != 3:
        raise ValueError(f"strides must hold one stride per stage (3), got {strides}")
    dilations = tuple(_checks.positive_int("dilations", v) for v in dilations)
    if not dilations:
        raise ValueError("dilations must not be empty")
    return widths[0], widths, strides, dilations


def check_depth(depth: int | Sequence[int]) -> int | tuple[int, int, int]:
    """A DSCNet's ``depth``: one positive int (blocks in each stage) or three (one per stage)."""
    if not isinstance(depth, Sequence) or isinstance(depth, str):
        return _checks.positive_int("depth", depth)
    depths = tuple(_checks.positive_int("depth", v) for v in depth)
    if len(depths) != 3:
        raise ValueError(f"depth must be one int or one per stage (3), got {depths}")
    return depths


def check_kernel_size(kernel_size: int) -> int:
    """A DSCNet's depthwise ``kernel_size``: a positive odd int (the padding ``d(k-1)/2`` of both
    frameworks is symmetric only for odd ``k``)."""
    k = _checks.positive_int("kernel_size", kernel_size)
    if k % 2 == 0:
        raise ValueError(f"kernel_size must be odd (symmetric 'same' padding), got {k}")
    return k


class DSCNet(nnx.Module):
    """Image classifier: normalise -> conv stem -> separable dilated blocks -> pool -> linear.

    Takes images as a PyTorch user has them after ``ToTensor()``: float in
    ``[0, 1]``, here channels-last ``(N, H, W, C)``; normalisation with fixed
    per-channel statistics is part of the model (``normalize``), so an
    exported model needs no preprocessing knowledge.

    Args:
      num_classes: output logits.
      in_features: image channels.
      width: channels of the first stage (then ``2w`` and ``4w``); default 32.
      depth: separable blocks per stage, or one count per stage (3 stages,
        see :func:`block_plan`).
      widths: the three stage widths instead (``width``, if given, must be
        the first).
      strides: stride of each stage's first block; ``(1, 2, 1)`` ends a 32x32
        input at 16x16, ``(1, 2, 2)`` at 8x8.
      dilations: dilations of stage 3 in turn (stage 2 alternates 1 and
        ``dilations[0]``).
      kernel_size: taps (``k x k``, odd) of every separable block's depthwise
        conv; the stem stays 3x3.
      stem_width: channels of the stem conv (default: the first stage's
        width); a narrower stem keeps the full-resolution maps cheap while
        the first stage widens after its strided block.
      activation: activation name used throughout.
      se_ratio: squeeze-and-excitation in every separable block, after its
        depthwise conv (:class:`jaxdsc.SeparableBlock`); ``0``: none.
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
        width: int | None = None,
        depth: int | Sequence[int] = 2,
        widths: Sequence[int] | None = None,
        strides: Sequence[int] = (1, 2, 1),
        dilations: Sequence[int] = (2, 4),
        kernel_size: int = 3,
        stem_width: int | None = None,
        activation: str = "relu",
        se_ratio: float = 0.0,
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
        self.width, self.widths, self.strides, self.dilations = stage_config(width, widths, strides, dilations)
        self.depth = check_depth(depth)
        self.kernel_size = check_kernel_size(kernel_size)
        self.stem_width = self.width if stem_width is None else _checks.positive_int("stem_width", stem_width)
        self.activation = check_activation("activation", activation)
        self.se_ratio = _checks.number("se_ratio", se_ratio, low=0.0, high=1.0)
        self.momentum, self.epsilon = momentum, epsilon
        self.dtype, self.impl = dtype, impl
        common = dict(activation=activation, momentum=momentum, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, precision=precision, rngs=rngs)
        if in_features == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = (0.5,) * in_features, (0.5,) * in_features
        self.normalize = Normalize(in_features, mean, std, param_dtype=param_dtype)
        self.stem = ConvBlock(in_features, self.stem_width, 3, impl=impl, **common)
        self.blocks = nnx.List([
            SeparableBlock(
                b.in_features, b.out_features, self.kernel_size, strides=b.stride, kernel_dilation=b.dilation,
                residual=b.in_features == b.out_features and b.stride == 1, se_ratio=self.se_ratio, impl=impl,
                **common,
            )
            for b in block_plan(self.widths, self.depth, self.dilations, self.strides, self.stem_width)
        ])
        self.head = nnx.Linear(self.widths[2], num_classes, param_dtype=param_dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled features ``(N, widths[2])`` in float32 (float64 for float64 activations)."""
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
