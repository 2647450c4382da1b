"""torchvision's EfficientNet B0-B7 family: read the variant and arguments from an instance.

The variant is the one whose stem width and stage depths equal the instance's
(B0-B7 differ in at least one); ``num_classes`` and ``dropout`` come from the
classifier, ``stochastic_depth_prob`` from the last block's rate (torchvision sets block
``i`` of ``n`` to ``p * i / n``). The tree the configuration builds must equal the
instance's (:func:`torch_bridge.zoo.check_structure`).
"""

from __future__ import annotations

from typing import Any

import torchvision
from torchvision.models import efficientnet as tv_effnet

from jaxdsc.models.torchvision_efficientnet import VARIANTS, stage_plan
from torch_bridge.errors import UnsupportedModelError
from torch_bridge.zoo._family import Family, register_family
from torch_bridge.zoo.torchvision_mobilenet import read_attr

NAMES = tuple(f"torchvision:{v}" for v in VARIANTS)


def _signature(variant: str) -> list[int]:
    plan = stage_plan(variant)
    return [plan[0].input_channels] + [s.num_layers for s in plan] + [s.out_channels for s in plan]


def effnet_config(m: Any) -> tuple[str, dict[str, Any]]:
    src = "torchvision EfficientNet (torch)"
    feats = read_attr(src, "features", lambda: list(m.features))
    found = read_attr(src, "stages", lambda: [feats[0][0].out_channels] + [len(s) for s in feats[1:-1]]
                      + [s[-1].out_channels for s in feats[1:-1]])
    variant = next((v for v in VARIANTS if _signature(v) == found), None)
    if variant is None:
        raise UnsupportedModelError(
            f"{src}: stem width, stage depths and widths {found} match none of efficientnet_b0..b7 "
            "(EfficientNetV2 and custom settings are not supported)")
    name = f"torchvision:{variant}"
    num_classes = read_attr(name, "num_classes (classifier.1)", lambda: m.classifier[1].out_features)
    dropout = read_attr(name, "dropout (classifier.0)", lambda: float(m.classifier[0].p))
    total = sum(found[1:8])
    last_p = read_attr(name, "stochastic depth (last block)", lambda: float(feats[-2][-1].stochastic_depth.p))
    sd = round(last_p * total / (total - 1), 10) if total > 1 else 0.2
    return name, {"num_classes": num_classes, "dropout": dropout, "stochastic_depth_prob": sd}


def build_effnet(name: str, config: dict[str, Any]) -> Any:
    return getattr(torchvision.models, name.split(":", 1)[1])(weights=None, **config)


register_family(Family(NAMES, tv_effnet.EfficientNet, effnet_config, build_effnet))
