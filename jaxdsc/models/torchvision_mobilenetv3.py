"""torchvision's MobileNetV3 (large / small) in Flax NNX (NHWC), module tree and names as upstream.

``create("torchvision:mobilenet_v3_large", rngs=..., dilated=True)`` takes
``torchvision.models.mobilenet_v3_large``'s keyword arguments (``width_mult``,
``reduced_tail``, ``dilated``, ``num_classes``, ``dropout``) with its defaults.
BatchNorm uses eps 1e-3 and torch momentum 0.01, as torchvision's MobileNetV3 does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.models._common import (
    FeatureSequential,
    Layers,
    Sequential,
    SqueezeExcitation,
    activation,
    check_dropout,
    check_none,
    global_avg_pool,
    make_divisible,
)
from jaxdsc.models._registry import register_model

BN_EPS, BN_MOMENTUM = 0.001, 0.01


class BlockConfig(NamedTuple):
    """torchvision's ``InvertedResidualConfig`` after width adjustment."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hs: bool
    stride: int
    dilation: int


# (input, kernel, expanded, out, use_se, activation, stride, dilated?) before width adjustment;
# the last entry says whether the row belongs to the tail that `reduced_tail` halves and `dilated` dilates.
_LARGE = ((16, 3, 16, 16, False, "RE", 1, 0), (16, 3, 64, 24, False, "RE", 2, 0),
          (24, 3, 72, 24, False, "RE", 1, 0), (24, 5, 72, 40, True, "RE", 2, 0),
          (40, 5, 120, 40, True, "RE", 1, 0), (40, 5, 120, 40, True, "RE", 1, 0),
          (40, 3, 240, 80, False, "HS", 2, 0), (80, 3, 200, 80, False, "HS", 1, 0),
          (80, 3, 184, 80, False, "HS", 1, 0), (80, 3, 184, 80, False, "HS", 1, 0),
          (80, 3, 480, 112, True, "HS", 1, 0), (112, 3, 672, 112, True, "HS", 1, 0),
          (112, 5, 672, 160, True, "HS", 2, 1), (160, 5, 960, 160, True, "HS", 1, 2),
          (160, 5, 960, 160, True, "HS", 1, 2))
_SMALL = ((16, 3, 16, 16, True, "RE", 2, 0), (16, 3, 72, 24, False, "RE", 2, 0),
          (24, 3, 88, 24, False, "RE", 1, 0), (24, 5, 96, 40, True, "HS", 2, 0),
          (40, 5, 240, 40, True, "HS", 1, 0), (40, 5, 240, 40, True, "HS", 1, 0),
          (40, 5, 120, 48, True, "HS", 1, 0), (48, 5, 144, 48, True, "HS", 1, 0),
          (48, 5, 288, 96, True, "HS", 2, 1), (96, 5, 576, 96, True, "HS", 1, 2),
          (96, 5, 576, 96, True, "HS", 1, 2))
ARCHS = {"mobilenet_v3_large": (_LARGE, 1280), "mobilenet_v3_small": (_SMALL, 1024)}


def block_plan(arch: str, width_mult: float = 1.0, reduced_tail: bool = False,
               dilated: bool = False) -> tuple[list[BlockConfig], int]:
    """torchvision's ``_mobilenet_v3_conf``: the blocks and ``last_channel`` of ``arch``.

    In the tail (the last stride-2 stage) ``reduced_tail`` halves the channels and
    ``dilated`` uses dilation 2.
    """
    rows, last = ARCHS[arch]
    div = 2 if reduced_tail else 1
    dilation = 2 if dilated else 1

    def adjust(c: int) -> int:
        return make_divisible(c * width_mult, 8)

    plan = []
    for inp, k, exp, out, se, act, s, tail in rows:
        # tail 1: the first tail block (its input is not reduced); tail 2: the others.
        if tail == 2:
            inp, exp = inp // div, exp // div
        if tail:
            out = out // div
        plan.append(BlockConfig(adjust(inp), k, adjust(exp), adjust(out), se, act == "HS", s,
                                dilation if tail else 1))
    return plan, adjust(last // div)


class InvertedResidual(nnx.Module):
    """``block``: [1x1 expand] -> kxk depthwise (dilated) -> [SE] -> 1x1 project (no activation)."""

    def __init__(self, cnf: BlockConfig, *, layers: Layers):
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        act = "hardswish" if cnf.use_hs else "relu"
        bn = dict(eps=BN_EPS, momentum=BN_MOMENTUM)
        seq: list[nnx.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            seq.append(layers.conv_norm_act(cnf.input_channels, cnf.expanded_channels, 1, act=act, **bn))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        seq.append(layers.conv_norm_act(cnf.expanded_channels, cnf.expanded_channels, cnf.kernel, stride,
                                        dilation=cnf.dilation, groups=cnf.expanded_channels, act=act, **bn))
        if cnf.use_se:
            squeeze = make_divisible(cnf.expanded_channels // 4, 8)
            seq.append(SqueezeExcitation(cnf.expanded_channels, squeeze, layers=layers,
                                         activation_name="relu", scale_activation="hardsigmoid"))
        seq.append(layers.conv_norm_act(cnf.expanded_channels, cnf.out_channels, 1, act=None, **bn))
        self.block = Sequential(seq)
        self.out_channels = cnf.out_channels
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.block(x)
        return y + x if self.use_res_connect else y


def feature_layers(plan: list[BlockConfig], lay: Layers) -> tuple[list[nnx.Module], list[int]]:
    """The items of torchvision's ``MobileNetV3.features`` (stem, blocks, 1x1 head) and their strides."""
    bn = dict(eps=BN_EPS, momentum=BN_MOMENTUM)
    feats: list[nnx.Module] = [lay.conv_norm_act(3, plan[0].input_channels, 3, 2, act="hardswish", **bn)]
    strides = [2]
    for cnf in plan:
        feats.append(InvertedResidual(cnf, layers=lay))
        strides.append(feats[-1].stride)
    feats.append(lay.conv_norm_act(plan[-1].out_channels, 6 * plan[-1].out_channels, 1, act="hardswish", **bn))
    strides.append(1)
    return feats, strides


def stage_indices(plan: list[BlockConfig]) -> list[int]:
    """torchvision's ``stage_indices`` of the segmentation builders: the stem, every block
    whose configured stride is 2 (``_is_cn``, also when dilation replaces it), the head."""
    return [0] + [i + 1 for i, cnf in enumerate(plan) if cnf.stride > 1] + [len(plan) + 1]


class MobileNetV3(nnx.Module):
    """MobileNetV3 (Howard et al. 2019) as ``torchvision.models.MobileNetV3``.

    ``__call__``: images ``(N, H, W, 3)`` -> logits. The stem is a stride-2 3x3 conv and the
    network downsamples 32x (16x with ``dilated=True``): a 32x32 input ends at 1x1 (2x2 dilated)
    before the global pooling. ``features(x)``: the maps at strides 2, 4, 8, 16, 32 (the last,
    the 1x1 head's output, is upstream's ``model.features(x)``); with ``dilated`` the stride-32
    stage stays at stride 16.
    """

    def __init__(self, arch: str, *, width_mult: float = 1.0, reduced_tail: bool = False,
                 dilated: bool = False, num_classes: int = 1000, block: Any = None,
                 norm_layer: Any = None, dropout: float = 0.2, rngs: nnx.Rngs,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, impl: str = "auto"):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        check_none("block", block)
        check_none("norm_layer", norm_layer)
        num_classes = _checks.positive_int("num_classes", num_classes)
        dropout = check_dropout("dropout", dropout)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        reduced_tail = _checks.boolean("reduced_tail", reduced_tail)
        dilated = _checks.boolean("dilated", dilated)
        self.model_name = f"torchvision:{arch}"
        self.config = {"width_mult": float(width_mult), "reduced_tail": reduced_tail, "dilated": dilated,
                       "num_classes": num_classes, "dropout": dropout}
        lay = Layers(rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
        plan, last_channel = block_plan(arch, width_mult, reduced_tail, dilated)
        feats, strides = feature_layers(plan, lay)
        head = 6 * plan[-1].out_channels
        self.features = FeatureSequential(feats, strides)
        self.classifier = Sequential([lay.linear(head, last_channel), activation("hardswish"),
                                      lay.dropout(dropout), lay.linear(last_channel, num_classes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(global_avg_pool(self.features(x)[-1]))


def _builder(arch: str):
    def build(*, rngs: nnx.Rngs, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False,
              num_classes: int = 1000, block: Any = None, norm_layer: Any = None, dropout: float = 0.2,
              dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, impl: str = "auto") -> MobileNetV3:
        return MobileNetV3(arch, width_mult=width_mult, reduced_tail=reduced_tail, dilated=dilated,
                           num_classes=num_classes, block=block, norm_layer=norm_layer, dropout=dropout,
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)

    build.__name__ = arch
    build.__doc__ = f"``torchvision.models.{arch}(**kwargs)`` in JAX (random init; weights come from the bridge)."
    return build


mobilenet_v3_large = register_model("torchvision:mobilenet_v3_large")(_builder("mobilenet_v3_large"))
mobilenet_v3_small = register_model("torchvision:mobilenet_v3_small")(_builder("mobilenet_v3_small"))
