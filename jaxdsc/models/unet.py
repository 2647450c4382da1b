"""U-Net for semantic segmentation built from depthwise-separable blocks, with a dilated bottleneck.

Layout (``w_i = width * 2**i``, ``i = 0 .. depth``)::

    normalize -> encoder[0]: ConvBlock(in, w0) (the stem, always dense), block(w0, w0)
    encoder[i], i >= 1: 2x2 max pool, block(w_{i-1}, w_i), block(w_i, w_i)
    bottleneck[j]: h = h + block(w_d, w_d, dilation=dilations[j])   (no further pooling)
    decoder[k] for level i = depth-1 .. 0: nearest 2x upsample cropped to the skip's size,
      concat [skip_i, up] on channels, block(w_i + w_{i+1}, w_i), block(w_i, w_i)
    head: PointwiseConv(w0, num_classes)

"block" is a :class:`jaxdsc.SeparableBlock` (depthwise -> BN -> act -> pointwise
-> BN -> act), or with ``separable=False`` a :class:`jaxdsc.ConvBlock` (dense
conv -> BN -> act) with the same kernel, dilation and widths: the same network
with regular convs, for the cost/accuracy comparison. Odd sizes work at every
level: pooling pads the high side with ``-inf`` (PyTorch's ``ceil_mode``), and
upsampling crops to the skip connection's size. Nearest upsampling and
cropping are copies, so the PyTorch twin (``torch_bridge.nn.UNet``) computes
them bit-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.activations import check_activation
from jaxdsc.blocks import ConvBlock, SeparableBlock
from jaxdsc.conv import PointwiseConv
from jaxdsc.models._registry import register_model
from jaxdsc.norm import Normalize

UNET_MEAN, UNET_STD = 0.5, 0.25  # per channel, for [0, 1] images


def check_dilations(dilations: object) -> tuple[int, ...]:
    """The bottleneck dilations as a tuple of ints >= 1 (shared with the PyTorch twin)."""
    if isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence):
        raise TypeError(f"dilations must be a sequence of ints, got {dilations!r}")
    return tuple(_checks.positive_int(f"dilations[{i}]", d) for i, d in enumerate(dilations))


def max_pool_ceil(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, on ``(N, H, W, C)``; odd sizes round up (``-inf`` pads the high side)."""
    pads = ((0, 0), *((0, n % 2) for n in x.shape[1:-1]), (0, 0))
    window = (1, *(2,) * (x.ndim - 2), 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, window, window, pads)


def upsample_to(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Nearest 2x upsampling of ``(N, H, W, C)``, cropped to the spatial ``shape``."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x[(slice(None), *(slice(0, n) for n in shape), slice(None))]


class UNet(nnx.Module):
    """Segmentation network: images ``(N, H, W, C)`` in ``[0, 1]`` -> logits ``(N, H, W, num_classes)``.

    Args:
      num_classes: output channels (class logits per pixel).
      in_features: image channels.
      width: channels at full resolution; level ``i`` has ``width * 2**i``.
      depth: number of 2x poolings (the bottleneck runs at ``1 / 2**depth``).
      dilations: one residual block per entry in the bottleneck, with that dilation.
      separable: separable blocks (default) or dense ``ConvBlock`` s.
      activation, momentum, epsilon: block settings (Flax momentum convention).
      impl: depthwise implementation (see :class:`jaxdsc.DepthwiseConv`).
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        in_features: int = 3,
        width: int = 16,
        depth: int = 3,
        dilations: Sequence[int] = (2, 4),
        separable: bool = True,
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
        self.dilations = check_dilations(dilations)
        self.separable = _checks.boolean("separable", separable)
        self.activation = check_activation("activation", activation)
        self.momentum, self.epsilon = momentum, epsilon
        self.dtype, self.impl = dtype, impl
        common = dict(activation=activation, momentum=momentum, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, precision=precision, rngs=rngs)

        def block(cin: int, cout: int, dilation: int = 1) -> nnx.Module:
            if separable:
                return SeparableBlock(cin, cout, 3, kernel_dilation=dilation, impl=impl, **common)
            return ConvBlock(cin, cout, 3, kernel_dilation=dilation, **common)

        w = [width * 2**i for i in range(depth + 1)]
        self.normalize = Normalize(in_features, (UNET_MEAN,) * in_features, (UNET_STD,) * in_features,
                                   param_dtype=param_dtype)
        self.encoder = nnx.List(
            [nnx.List([ConvBlock(in_features, w[0], 3, **common), block(w[0], w[0])])]
            + [nnx.List([block(w[i - 1], w[i]), block(w[i], w[i])]) for i in range(1, depth + 1)]
        )
        self.bottleneck = nnx.List([block(w[depth], w[depth], d) for d in self.dilations])
        self.decoder = nnx.List([
            nnx.List([block(w[i] + w[i + 1], w[i]), block(w[i], w[i])])
            for i in reversed(range(depth))
        ])
        self.head = PointwiseConv(w[0], num_classes, dtype=dtype, param_dtype=param_dtype,
                                  precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.normalize(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            if i:
                h = max_pool_ceil(h)
            for blk in stage:
                h = blk(h)
            skips.append(h)
        for blk in self.bottleneck:
            h = h + blk(h)
        for stage, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            h = jnp.concatenate([skip, upsample_to(h, skip.shape[1:-1]).astype(skip.dtype)], axis=-1)
            for blk in stage:
                h = blk(h)
        return self.head(h)


@register_model("jaxdsc:unet")
def unet(*, rngs: nnx.Rngs, **kwargs) -> UNet:
    """:class:`UNet` with its constructor's keyword arguments."""
    return UNet(rngs=rngs, **kwargs)
