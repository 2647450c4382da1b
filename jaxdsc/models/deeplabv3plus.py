"""DeepLabV3+ (Chen et al. 2018) on any zoo backbone with ``features(x)``, NHWC.

Encoder: the backbone's last feature map -> ASPP (a 1x1 branch, three 3x3 atrous
branches at rates 6/12/18 scaled to the output stride, an image-pooling branch,
concatenated and projected to 256 channels). Decoder: the stride-4 feature map
reduced to 48 channels by a 1x1 conv, concatenated with the ASPP output
upsampled to its size, two 3x3 convs of 256, a 1x1 classifier, and a bilinear
upsampling (``align_corners=False``) to the input size.

``separable_aspp=True`` makes every 3x3 conv of the head (the atrous ASPP branches
and the decoder's two convs) depthwise-separable: depthwise -> BN -> ReLU ->
pointwise -> BN -> ReLU, as the paper's "separable ASPP and decoder"; ``False``
builds the same head with regular convs (conv -> BN -> ReLU) for the paper's
comparison. The PyTorch twin is :class:`torch_bridge.nn.DeepLabV3Plus` (same
state-dict names: ``backbone.*`` are the upstream backbone's own).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv
from jaxdsc.models._common import resize_bilinear
from jaxdsc.models._registry import create, get_builder, register_model
from jaxdsc.norm import BatchNorm

__all__ = ["DeepLabV3Plus", "aspp_rates", "backbone_kwargs_for"]

BN_EPS, BN_MOMENTUM = 1e-5, 0.9  # torch BatchNorm2d defaults (momentum 0.1) in the Flax convention


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The atrous rates of the three 3x3 ASPP branches: 6/12/18 at stride 16, scaled as 96/stride."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return tuple(r * 16 // output_stride for r in (6, 12, 18))  # type: ignore[return-value]


def backbone_kwargs_for(backbone: str, backbone_kwargs: dict[str, Any] | None,
                        output_stride: int) -> dict[str, Any]:
    """The backbone's constructor kwargs as DeepLabV3+ builds it (shared with the twin).

    timm backbones get ``num_classes=0`` (no classifier) and ``output_stride`` unless
    given; torchvision ones are built as given (their output stride is their own).
    """
    kwargs = dict(backbone_kwargs or {})
    if backbone.startswith("timm:"):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("output_stride", output_stride)
    return kwargs


class ConvBNReLU(nnx.Module):
    """``conv`` (no bias) -> ``bn`` -> ReLU; ``conv`` is a 1x1 :class:`PointwiseConv` or a dense 3x3."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int, opts: dict[str, Any], rngs: nnx.Rngs):
        dt = dict(dtype=opts["dtype"], param_dtype=opts["param_dtype"])
        self.conv = (PointwiseConv(cin, cout, use_bias=False, rngs=rngs, **dt) if k == 1 else
                     Conv(cin, cout, k, kernel_dilation=dilation, padding="SYMMETRIC",
                          use_bias=False, rngs=rngs, **dt))
        self.bn = BatchNorm(cout, epsilon=BN_EPS, momentum=BN_MOMENTUM, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x), activation="relu")


class SepConvBNReLU(nnx.Module):
    """3x3 ``conv_dw`` (dilated) -> ``bn_dw`` -> ReLU -> ``conv_pw`` -> ``bn_pw`` -> ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int, opts: dict[str, Any], rngs: nnx.Rngs):
        dt = dict(dtype=opts["dtype"], param_dtype=opts["param_dtype"])
        self.conv_dw = DepthwiseConv(cin, 3, kernel_dilation=dilation, padding="SYMMETRIC",
                                     use_bias=False, impl=opts["impl"], rngs=rngs, **dt)
        self.bn_dw = BatchNorm(cin, epsilon=BN_EPS, momentum=BN_MOMENTUM, **dt)
        self.conv_pw = PointwiseConv(cin, cout, use_bias=False, rngs=rngs, **dt)
        self.bn_pw = BatchNorm(cout, epsilon=BN_EPS, momentum=BN_MOMENTUM, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn_dw(self.conv_dw(x), activation="relu")
        return self.bn_pw(self.conv_pw(x), activation="relu")


def conv3x3(cin: int, cout: int, dilation: int, separable: bool, opts: dict[str, Any],
            rngs: nnx.Rngs) -> nnx.Module:
    if separable:
        return SepConvBNReLU(cin, cout, dilation, opts, rngs)
    return ConvBNReLU(cin, cout, 3, dilation, opts, rngs)


class ASPPPooling(nnx.Module):
    """Image pooling: global average -> ``conv`` 1x1 -> ``bn`` -> ReLU -> broadcast to the map's size."""

    def __init__(self, cin: int, cout: int, opts: dict[str, Any], rngs: nnx.Rngs):
        self.block = ConvBNReLU(cin, cout, 1, 1, opts, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        pooled = jnp.mean(x.astype(acc), axis=(1, 2), keepdims=True).astype(x.dtype)
        y = self.block(pooled)
        return resize_bilinear(y, x.shape[1:3])  # from 1x1: a broadcast, as torch's interpolate


class ASPP(nnx.Module):
    """``branches`` (1x1, three atrous 3x3, ``pooling``) -> concat -> ``project`` (1x1 + BN + ReLU) -> dropout."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int], separable: bool,
                 dropout: float, opts: dict[str, Any], rngs: nnx.Rngs):
        self.branches = nnx.List([ConvBNReLU(cin, cout, 1, 1, opts, rngs)]
                                 + [conv3x3(cin, cout, r, separable, opts, rngs) for r in rates])
        self.pooling = ASPPPooling(cin, cout, opts, rngs)
        self.project = ConvBNReLU(5 * cout, cout, 1, 1, opts, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        ys = [b(x) for b in self.branches] + [self.pooling(x)]
        y = self.project(jnp.concatenate(ys, axis=-1))
        return y if self.dropout is None else self.dropout(y)


class Decoder(nnx.Module):
    """``reduce`` (low-level 1x1 to 48) ; concat with the upsampled ASPP output ; ``fuse`` (two 3x3)
    -> ``classifier`` (1x1 with bias)."""

    def __init__(self, low_ch: int, aspp_ch: int, low_out: int, ch: int, num_classes: int,
                 separable: bool, opts: dict[str, Any], rngs: nnx.Rngs):
        self.reduce = ConvBNReLU(low_ch, low_out, 1, 1, opts, rngs)
        self.fuse = nnx.List([conv3x3(aspp_ch + low_out, ch, 1, separable, opts, rngs),
                              conv3x3(ch, ch, 1, separable, opts, rngs)])
        self.classifier = PointwiseConv(ch, num_classes, dtype=opts["dtype"],
                                        param_dtype=opts["param_dtype"], rngs=rngs)

    def __call__(self, high: jax.Array, low: jax.Array) -> jax.Array:
        low = self.reduce(low)
        high = resize_bilinear(high, low.shape[1:3]).astype(low.dtype)
        y = jnp.concatenate([high, low], axis=-1)
        for layer in self.fuse:
            y = layer(y)
        return self.classifier(y)


def _feature_meta(backbone: nnx.Module, in_chans: int) -> list[tuple[int, int]]:
    """(channels, stride) of each map of ``backbone.features`` from an abstract 64x64 forward."""
    graphdef, state = nnx.split(backbone)

    def run(st, x):
        return nnx.merge(graphdef, st).features(x)

    size = 64
    x = jax.ShapeDtypeStruct((2, size, size, in_chans), jnp.float32)
    maps = jax.eval_shape(run, state, x)
    return [(int(m.shape[-1]), size // int(m.shape[1])) for m in maps]


class DeepLabV3Plus(nnx.Module):
    """DeepLabV3+: images ``(N, H, W, C)`` -> per-pixel logits ``(N, H, W, num_classes)``.

    Args:
      backbone: a :func:`jaxdsc.models.create` name whose model has ``features(x)``
        returning maps with one at stride 4 (``"timm:xception65"``, ``"torchvision:mobilenet_v2"``).
      backbone_kwargs: its constructor arguments (see :func:`backbone_kwargs_for`).
      num_classes: segmentation classes.
      output_stride: stride of the backbone's last map, 8 / 16 / 32; sets the atrous rates
        (:func:`aspp_rates`). Passed to timm backbones; a backbone with a fixed stride
        (torchvision's MobileNetV2: 32) must be given its own.
      separable_aspp: separable (True) or regular (False) 3x3 convs in ASPP and decoder.
      aspp_channels, low_level_channels: 256 and 48 as the paper.
      dropout: after the ASPP projection (0.1 as the paper's code), training only.
    """

    def __init__(self, backbone: str = "timm:xception65", backbone_kwargs: dict[str, Any] | None = None,
                 num_classes: int = 21, output_stride: int = 16, separable_aspp: bool = True,
                 aspp_channels: int = 256, low_level_channels: int = 48, dropout: float = 0.1, *,
                 rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 impl: str = "auto"):
        if not isinstance(backbone, str):
            raise TypeError(f"backbone must be a model name (str), got {type(backbone).__name__}")
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
            raise TypeError(f"backbone_kwargs must be a dict or None, got {type(backbone_kwargs).__name__}")
        rates = aspp_rates(output_stride)
        kwargs = backbone_kwargs_for(backbone, backbone_kwargs, output_stride)
        builder = get_builder(backbone)
        self.model_name = "jaxdsc:deeplabv3plus"
        self.config = dict(
            backbone=backbone, backbone_kwargs=kwargs,
            num_classes=_checks.positive_int("num_classes", num_classes),
            output_stride=output_stride, separable_aspp=_checks.boolean("separable_aspp", separable_aspp),
            aspp_channels=_checks.positive_int("aspp_channels", aspp_channels),
            low_level_channels=_checks.positive_int("low_level_channels", low_level_channels),
            dropout=_checks.number("dropout", dropout, low=0.0, high=1.0),
        )
        extra = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, impl=impl).items()
                 if _accepts(builder, k)}
        self.backbone = create(backbone, rngs=rngs, **kwargs, **extra)
        if not callable(getattr(self.backbone, "features", None)):
            raise ValueError(f"backbone {backbone!r} has no features(x) method")
        in_chans = int(kwargs.get("in_chans", 3))
        meta = _feature_meta(self.backbone, in_chans)
        high_ch, high_stride = meta[-1]
        if high_stride != output_stride:
            raise ValueError(
                f"output_stride={output_stride} but backbone {backbone!r} with {kwargs} ends at stride "
                f"{high_stride}; pass output_stride={high_stride} (or a backbone that dilates)")
        lows = [i for i, (_, s) in enumerate(meta) if s == 4]
        if not lows:
            raise ValueError(f"backbone {backbone!r} has no feature map at stride 4 (strides {meta})")
        self.low_index = lows[-1]
        opts = dict(dtype=dtype, param_dtype=param_dtype, impl=impl)
        self.aspp = ASPP(high_ch, aspp_channels, rates, separable_aspp, dropout, opts, rngs)
        self.decoder = Decoder(meta[self.low_index][0], aspp_channels, low_level_channels,
                               aspp_channels, num_classes, separable_aspp, opts, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        feats = self.backbone.features(x)
        y = self.decoder(self.aspp(feats[-1]), feats[self.low_index])
        return resize_bilinear(y, x.shape[1:3])


def _accepts(builder: Any, name: str) -> bool:
    import inspect

    params = inspect.signature(builder).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@register_model("jaxdsc:deeplabv3plus")
def deeplabv3plus(*, rngs: nnx.Rngs, backbone: str = "timm:xception65",
                  backbone_kwargs: dict[str, Any] | None = None, num_classes: int = 21,
                  output_stride: int = 16, separable_aspp: bool = True, aspp_channels: int = 256,
                  low_level_channels: int = 48, dropout: float = 0.1, dtype: Dtype | None = None,
                  param_dtype: Dtype = jnp.float32, impl: str = "auto") -> DeepLabV3Plus:
    """:class:`DeepLabV3Plus` with its constructor's keyword arguments."""
    return DeepLabV3Plus(backbone, backbone_kwargs, num_classes, output_stride, separable_aspp,
                         aspp_channels, low_level_channels, dropout, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, impl=impl)
