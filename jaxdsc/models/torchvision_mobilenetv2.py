"""torchvision's MobileNetV2 in Flax NNX (NHWC), module tree and names as upstream.

``create("torchvision:mobilenet_v2", rngs=..., width_mult=0.75, num_classes=10)`` takes
``torchvision.models.mobilenet_v2``'s keyword arguments with its defaults; the
state-dict names of the JAX model are torchvision's (``features.3.conv.1.0.weight``),
so ``torch_bridge`` converts it both ways exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.models._common import (
    FeatureSequential,
    Layers,
    Sequential,
    check_dropout,
    check_none,
    global_avg_pool,
    make_divisible,
)
from jaxdsc.models._registry import register_model

DEFAULT_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                   (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
"""torchvision's inverted residual setting: (expand ratio t, channels c, repeats n, stride s)."""


class InvertedResidual(nnx.Module):
    """``conv``: [1x1 expand (ReLU6)] -> 3x3 depthwise (ReLU6) -> 1x1 project -> BN; residual
    when the stride is 1 and the channels agree."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, *, layers: Layers):
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        hidden = round(inp * expand_ratio)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        seq: list[nnx.Module] = []
        if expand_ratio != 1:
            seq.append(layers.conv_norm_act(inp, hidden, 1, act="relu6"))
        seq += [layers.conv_norm_act(hidden, hidden, 3, stride, groups=hidden, act="relu6"),
                layers.conv(hidden, oup, 1), layers.bn(oup)]
        self.conv = Sequential(seq)
        self.out_channels = oup

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2(nnx.Module):
    """MobileNetV2 (Sandler et al. 2018) as ``torchvision.models.MobileNetV2``.

    ``__call__``: images ``(N, H, W, 3)`` -> logits ``(N, num_classes)``; the stem is a
    stride-2 3x3 conv and the network downsamples 32x in all (a 32x32 input ends at 1x1).
    ``features(x)``: the maps at strides 2, 4, 8, 16, 32 (a list; the last, the 1x1-conv head's
    output, is what upstream's ``model.features(x)`` returns).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None,
                 round_nearest: int = 8, block: Any = None, norm_layer: Any = None,
                 dropout: float = 0.2, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, impl: str = "auto"):
        check_none("block", block)
        check_none("norm_layer", norm_layer)
        num_classes = _checks.positive_int("num_classes", num_classes)
        round_nearest = _checks.positive_int("round_nearest", round_nearest)
        dropout = check_dropout("dropout", dropout)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        setting = DEFAULT_SETTING if inverted_residual_setting is None else inverted_residual_setting
        if len(setting) == 0 or any(len(row) != 4 for row in setting):
            raise ValueError(f"inverted_residual_setting should be non-empty or a 4-element list, "
                             f"got {inverted_residual_setting}")
        self.model_name = "torchvision:mobilenet_v2"
        self.config = {
            "num_classes": num_classes, "width_mult": float(width_mult),
            "inverted_residual_setting": None if inverted_residual_setting is None
            else [[int(v) for v in row] for row in setting],
            "round_nearest": round_nearest, "dropout": dropout,
        }
        lay = Layers(rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        feats: list[nnx.Module] = [lay.conv_norm_act(3, input_channel, 3, 2, act="relu6")]
        strides = [2]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                feats.append(InvertedResidual(input_channel, output_channel, stride, t, layers=lay))
                strides.append(stride)
                input_channel = output_channel
        feats.append(lay.conv_norm_act(input_channel, self.last_channel, 1, act="relu6"))
        strides.append(1)
        self.features = FeatureSequential(feats, strides)
        self.classifier = Sequential([lay.dropout(dropout), lay.linear(self.last_channel, num_classes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.features(x)[-1]
        return self.classifier(global_avg_pool(h))


@register_model("torchvision:mobilenet_v2")
def mobilenet_v2(*, rngs: nnx.Rngs, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None,
                 round_nearest: int = 8, block: Any = None, norm_layer: Any = None,
                 dropout: float = 0.2, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 impl: str = "auto") -> MobileNetV2:
    """``torchvision.models.mobilenet_v2(**kwargs)`` in JAX (random init; weights come from the bridge)."""
    return MobileNetV2(num_classes, width_mult, inverted_residual_setting, round_nearest, block,
                       norm_layer, dropout, rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
