"""torchvision's DeepLabV3 and LR-ASPP on MobileNetV3-Large in Flax NNX (NHWC), names as upstream.

``create("torchvision:deeplabv3_mobilenet_v3_large", rngs=..., num_classes=21, aux_loss=True)``
and ``create("torchvision:lraspp_mobilenet_v3_large", rngs=..., num_classes=21)`` take the
torchvision builders' arguments. The backbone is ``mobilenet_v3_large(dilated=True).features``
cut after the last layer used (output stride 16), as torchvision's
``IntermediateLayerGetter``; the models return a dict (``"out"``, and ``"aux"`` with
``aux_loss``) of NHWC logits resized to the input with bilinear interpolation
(``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.models._common import (
    AdaptiveAvgPool1,
    Layers,
    Sequential,
    activation,
    resize_bilinear,
)
from jaxdsc.models._registry import register_model
from jaxdsc.models.torchvision_mobilenetv3 import block_plan, feature_layers, stage_indices


class IntermediateLayers(Sequential):
    """torchvision's ``IntermediateLayerGetter``: items ``0..k`` run in order, returning the
    outputs named by ``return_layers`` (item index -> output name) as a dict."""

    def __init__(self, layers: Sequence[nnx.Module], return_layers: Mapping[int, str]):
        last = max(return_layers)
        super().__init__(list(layers)[: last + 1])
        self.return_layers = dict(return_layers)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:  # type: ignore[override]
        out = {}
        for i, layer in enumerate(self):
            x = layer(x)
            if i in self.return_layers:
                out[self.return_layers[i]] = x
        return out


def _backbone(lay: Layers, return_layers: dict[str, int]) -> tuple[IntermediateLayers, dict[str, int]]:
    """MobileNetV3-Large (dilated) features returning ``{name: index}``; also their channels."""
    plan, _ = block_plan("mobilenet_v3_large", dilated=True)
    feats, _ = feature_layers(plan, lay)
    stages = stage_indices(plan)
    positions = {name: stages[i] for name, i in return_layers.items()}
    channels = {name: feats[pos].out_channels if hasattr(feats[pos], "out_channels")
                else 6 * plan[-1].out_channels for name, pos in positions.items()}
    return IntermediateLayers(feats, {pos: name for name, pos in positions.items()}), channels


class ASPPPooling(Sequential):
    """Image pooling branch: global average -> 1x1 conv -> BN -> ReLU, resized back to the input."""

    def __call__(self, x: jax.Array) -> jax.Array:
        size = x.shape[1:3]
        return resize_bilinear(super().__call__(x), size)


class ASPP(nnx.Module):
    """``convs``: 1x1 branch, one 3x3 atrous branch per rate, the pooling branch; ``project``:
    1x1 conv -> BN -> ReLU -> dropout 0.5 on their concatenation."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256, *,
                 lay: Layers):
        branches: list[nnx.Module] = [Sequential([lay.conv(in_channels, out_channels, 1), lay.bn(out_channels),
                                                  activation("relu")])]
        for rate in atrous_rates:
            branches.append(Sequential([lay.conv(in_channels, out_channels, 3, dilation=rate, padding=rate),
                                        lay.bn(out_channels), activation("relu")]))
        branches.append(ASPPPooling([AdaptiveAvgPool1(), lay.conv(in_channels, out_channels, 1),
                                     lay.bn(out_channels), activation("relu")]))
        self.convs = nnx.List(branches)
        self.project = Sequential([lay.conv(len(branches) * out_channels, out_channels, 1), lay.bn(out_channels),
                                   activation("relu"), lay.dropout(0.5)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(jnp.concatenate([conv(x) for conv in self.convs], axis=-1))


def deeplab_head(in_channels: int, num_classes: int, lay: Layers, atrous_rates: Sequence[int] = (12, 24, 36)):
    """torchvision's ``DeepLabHead``: ASPP -> 3x3 conv 256 -> BN -> ReLU -> 1x1 conv to the classes."""
    return Sequential([ASPP(in_channels, atrous_rates, lay=lay), lay.conv(256, 256, 3), lay.bn(256),
                       activation("relu"), lay.conv(256, num_classes, 1, bias=True)])


def fcn_head(in_channels: int, channels: int, lay: Layers) -> Sequential:
    """torchvision's ``FCNHead``: 3x3 conv (in/4) -> BN -> ReLU -> dropout 0.1 -> 1x1 conv."""
    inter = in_channels // 4
    return Sequential([lay.conv(in_channels, inter, 3), lay.bn(inter), activation("relu"), lay.dropout(0.1),
                       lay.conv(inter, channels, 1, bias=True)])


def _check_num_classes(num_classes: int | None) -> int:
    return 21 if num_classes is None else _checks.positive_int("num_classes", num_classes)


class DeepLabV3(nnx.Module):
    """DeepLabV3 (Chen et al. 2017) on a dilated MobileNetV3-Large, as torchvision builds it.

    ``__call__``: images ``(N, H, W, 3)`` -> ``{"out": (N, H, W, classes)}`` plus ``"aux"`` (the
    FCN head on the stride-8 features) with ``aux_loss``. ``features(x)``: the backbone's
    ``{"out": stride-16 map, ["aux": stride-8 map]}``.
    """

    def __init__(self, num_classes: int | None = None, aux_loss: bool | None = None, *, rngs: nnx.Rngs,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, impl: str = "auto"):
        num_classes = _check_num_classes(num_classes)
        aux = bool(_checks.boolean("aux_loss", aux_loss)) if aux_loss is not None else False
        self.model_name = "torchvision:deeplabv3_mobilenet_v3_large"
        self.config = {"num_classes": num_classes, "aux_loss": aux}
        lay = Layers(rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
        # torchvision: C5 (the last layer, stride 16) for "out", C2 (stage_indices[-4], stride 8) for "aux".
        self.backbone, ch = _backbone(lay, {"out": -1, **({"aux": -4} if aux else {})})
        self.classifier = deeplab_head(ch["out"], num_classes, lay)
        self.aux_classifier = fcn_head(ch["aux"], num_classes, lay) if aux else None

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        return self.backbone(x)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        size = x.shape[1:3]
        feats = self.backbone(x)
        result = {"out": resize_bilinear(self.classifier(feats["out"]), size)}
        if self.aux_classifier is not None:
            result["aux"] = resize_bilinear(self.aux_classifier(feats["aux"]), size)
        return result


class LRASPPHead(nnx.Module):
    """``cbr`` (1x1 conv -> BN -> ReLU) on the high features, gated by ``scale`` (global average ->
    1x1 conv -> sigmoid), resized to the low features; ``low_classifier + high_classifier``."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int, *,
                 lay: Layers):
        self.cbr = Sequential([lay.conv(high_channels, inter_channels, 1), lay.bn(inter_channels),
                               activation("relu")])
        self.scale = Sequential([AdaptiveAvgPool1(), lay.conv(high_channels, inter_channels, 1),
                                 activation("sigmoid")])
        self.low_classifier = lay.conv(low_channels, num_classes, 1, bias=True)
        self.high_classifier = lay.conv(inter_channels, num_classes, 1, bias=True)

    def __call__(self, feats: Mapping[str, jax.Array]) -> jax.Array:
        low, high = feats["low"], feats["high"]
        x = resize_bilinear(self.cbr(high) * self.scale(high), low.shape[1:3])
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(nnx.Module):
    """Lite R-ASPP (Howard et al. 2019) on a dilated MobileNetV3-Large, as torchvision builds it.

    ``__call__``: images ``(N, H, W, 3)`` -> ``{"out": (N, H, W, classes)}``. ``features(x)``:
    the backbone's ``{"low": stride-8 map, "high": stride-16 map}``.
    """

    def __init__(self, num_classes: int | None = None, aux_loss: bool | None = None, *, rngs: nnx.Rngs,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, impl: str = "auto"):
        if aux_loss:
            raise ValueError("aux_loss: this model does not use auxiliary loss (as torchvision)")
        num_classes = _check_num_classes(num_classes)
        self.model_name = "torchvision:lraspp_mobilenet_v3_large"
        self.config = {"num_classes": num_classes}
        lay = Layers(rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
        self.backbone, ch = _backbone(lay, {"low": -4, "high": -1})
        self.classifier = LRASPPHead(ch["low"], ch["high"], num_classes, 128, lay=lay)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        return self.backbone(x)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        out = self.classifier(self.backbone(x))
        return {"out": resize_bilinear(out, x.shape[1:3])}


@register_model("torchvision:deeplabv3_mobilenet_v3_large")
def deeplabv3_mobilenet_v3_large(*, rngs: nnx.Rngs, num_classes: int | None = None, aux_loss: bool | None = None,
                                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                                 impl: str = "auto") -> DeepLabV3:
    """``torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
    **kwargs)`` in JAX (random init; weights come from the bridge)."""
    return DeepLabV3(num_classes, aux_loss, rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)


@register_model("torchvision:lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(*, rngs: nnx.Rngs, num_classes: int | None = None, aux_loss: bool | None = None,
                              dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                              impl: str = "auto") -> LRASPP:
    """``torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
    **kwargs)`` in JAX (random init; weights come from the bridge)."""
    return LRASPP(num_classes, aux_loss, rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
