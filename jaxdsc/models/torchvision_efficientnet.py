"""torchvision's EfficientNet B0-B7 in Flax NNX (NHWC), module tree and names as upstream.

``create("torchvision:efficientnet_b0", rngs=..., num_classes=10)`` takes
``torchvision.models.efficientnet_b0``'s keyword arguments (``num_classes``, ``dropout``
with the variant's default, ``stochastic_depth_prob``). MBConv blocks with
squeeze-excitation and SiLU; stochastic depth on the residual branches in training
only (``"dropout"`` rng stream); BatchNorm eps / momentum as torchvision's builders set
them (B0-B4: 1e-5 / 0.1, B5-B7: 1e-3 / 0.01).
"""

from __future__ import annotations

import math
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
    StochasticDepth,
    check_dropout,
    check_none,
    global_avg_pool,
    make_divisible,
)
from jaxdsc.models._registry import register_model


class Variant(NamedTuple):
    width_mult: float
    depth_mult: float
    dropout: float
    bn_eps: float
    bn_momentum: float


VARIANTS = {
    "efficientnet_b0": Variant(1.0, 1.0, 0.2, 1e-5, 0.1),
    "efficientnet_b1": Variant(1.0, 1.1, 0.2, 1e-5, 0.1),
    "efficientnet_b2": Variant(1.1, 1.2, 0.3, 1e-5, 0.1),
    "efficientnet_b3": Variant(1.2, 1.4, 0.3, 1e-5, 0.1),
    "efficientnet_b4": Variant(1.4, 1.8, 0.4, 1e-5, 0.1),
    "efficientnet_b5": Variant(1.6, 2.2, 0.4, 1e-3, 0.01),
    "efficientnet_b6": Variant(1.8, 2.6, 0.5, 1e-3, 0.01),
    "efficientnet_b7": Variant(2.0, 3.1, 0.5, 1e-3, 0.01),
}

# (expand ratio, kernel, stride, input channels, output channels, layers) before scaling.
STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


class StageConfig(NamedTuple):
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def stage_plan(variant: str) -> list[StageConfig]:
    """torchvision's ``MBConvConfig`` list of ``variant`` (channels and depths scaled)."""
    v = VARIANTS[variant]
    return [StageConfig(e, k, s, make_divisible(i * v.width_mult, 8), make_divisible(o * v.width_mult, 8),
                        math.ceil(n * v.depth_mult)) for e, k, s, i, o, n in STAGES]


class MBConv(nnx.Module):
    """``block``: [1x1 expand, SiLU] -> kxk depthwise, SiLU -> SE (SiLU / sigmoid) -> 1x1 project;
    ``stochastic_depth`` on the residual branch."""

    def __init__(self, cnf: StageConfig, stochastic_depth_prob: float, *, layers: Layers, eps: float,
                 momentum: float):
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        bn = dict(eps=eps, momentum=momentum)
        expanded = make_divisible(cnf.input_channels * cnf.expand_ratio, 8)
        seq: list[nnx.Module] = []
        if expanded != cnf.input_channels:
            seq.append(layers.conv_norm_act(cnf.input_channels, expanded, 1, act="silu", **bn))
        seq.append(layers.conv_norm_act(expanded, expanded, cnf.kernel, cnf.stride, groups=expanded,
                                        act="silu", **bn))
        seq.append(SqueezeExcitation(expanded, max(1, cnf.input_channels // 4), layers=layers,
                                     activation_name="silu", scale_activation="sigmoid"))
        seq.append(layers.conv_norm_act(expanded, cnf.out_channels, 1, act=None, **bn))
        self.block = Sequential(seq)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row", rngs=layers.rngs)
        self.out_channels = cnf.out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.use_res_connect else y


class EfficientNet(nnx.Module):
    """EfficientNet (Tan & Le 2019) B0-B7 as ``torchvision.models.EfficientNet``.

    ``__call__``: images ``(N, H, W, 3)`` -> logits. A stride-2 3x3 stem, then seven stages
    (each an ``nn.Sequential`` of MBConv blocks), 32x downsampling in all: a 32x32 input ends
    at 1x1 before the global pooling. ``features(x)``: the maps at strides 2, 4, 8, 16, 32
    (the last, the 1x1 head's output, is upstream's ``model.features(x)``).
    """

    def __init__(self, variant: str, *, num_classes: int = 1000, dropout: float | None = None,
                 stochastic_depth_prob: float = 0.2, norm_layer: Any = None, rngs: nnx.Rngs,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, impl: str = "auto"):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        check_none("norm_layer", norm_layer)
        v = VARIANTS[variant]
        num_classes = _checks.positive_int("num_classes", num_classes)
        dropout = check_dropout("dropout", v.dropout if dropout is None else dropout)
        stochastic_depth_prob = check_dropout("stochastic_depth_prob", stochastic_depth_prob)
        self.model_name = f"torchvision:{variant}"
        self.config = {"num_classes": num_classes, "dropout": dropout,
                       "stochastic_depth_prob": stochastic_depth_prob}
        lay = Layers(rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl)
        bn = dict(eps=v.bn_eps, momentum=v.bn_momentum)
        plan = stage_plan(variant)
        feats: list[nnx.Module] = [lay.conv_norm_act(3, plan[0].input_channels, 3, 2, act="silu", **bn)]
        strides = [2]
        total = sum(c.num_layers for c in plan)
        block_id = 0
        for cnf in plan:
            stage = []
            for i in range(cnf.num_layers):
                block_cnf = cnf._replace(input_channels=cnf.out_channels, stride=1) if i else cnf
                sd_prob = stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(block_cnf, sd_prob, layers=lay, **bn))
                block_id += 1
            feats.append(Sequential(stage))
            strides.append(cnf.stride)
        head = 4 * plan[-1].out_channels
        feats.append(lay.conv_norm_act(plan[-1].out_channels, head, 1, act="silu", **bn))
        strides.append(1)
        self.features = FeatureSequential(feats, strides)
        self.classifier = Sequential([lay.dropout(dropout), lay.linear(head, num_classes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(global_avg_pool(self.features(x)[-1]))


def _builder(variant: str):
    def build(*, rngs: nnx.Rngs, num_classes: int = 1000, dropout: float = VARIANTS[variant].dropout,
              stochastic_depth_prob: float = 0.2, norm_layer: Any = None, dtype: Dtype | None = None,
              param_dtype: Dtype = jnp.float32, impl: str = "auto") -> EfficientNet:
        return EfficientNet(variant, num_classes=num_classes, dropout=dropout,
                            stochastic_depth_prob=stochastic_depth_prob, norm_layer=norm_layer, rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype, impl=impl)

    build.__name__ = variant
    build.__doc__ = f"``torchvision.models.{variant}(**kwargs)`` in JAX (random init; weights come from the bridge)."
    return build


for _variant in VARIANTS:
    register_model(f"torchvision:{_variant}")(_builder(_variant))
