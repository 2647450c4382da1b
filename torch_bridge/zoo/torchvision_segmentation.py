"""torchvision's DeepLabV3 / LR-ASPP on MobileNetV3-Large: read the arguments from an instance.

``num_classes`` comes from the last classifier conv, ``aux_loss`` from the presence of
``aux_classifier``; the rest (the dilated MobileNetV3-Large backbone cut at stride 16, the
heads) must equal what torchvision's builder makes (:func:`torch_bridge.zoo.check_structure`),
so DeepLabV3 on ResNets, or another backbone, is refused.
"""

from __future__ import annotations

from typing import Any

from torchvision.models import segmentation as tv_seg
from torchvision.models.segmentation import deeplabv3 as tv_deeplab
from torchvision.models.segmentation import lraspp as tv_lraspp

from torch_bridge.zoo._family import Family, register_family
from torch_bridge.zoo.torchvision_mobilenet import read_attr

DEEPLAB = "torchvision:deeplabv3_mobilenet_v3_large"
LRASPP = "torchvision:lraspp_mobilenet_v3_large"


def deeplab_config(m: Any) -> tuple[str, dict[str, Any]]:
    num_classes = read_attr(DEEPLAB, "num_classes (classifier.4)", lambda: m.classifier[4].out_channels)
    return DEEPLAB, {"num_classes": num_classes, "aux_loss": m.aux_classifier is not None}


def lraspp_config(m: Any) -> tuple[str, dict[str, Any]]:
    num_classes = read_attr(LRASPP, "num_classes (classifier.low_classifier)",
                            lambda: m.classifier.low_classifier.out_channels)
    return LRASPP, {"num_classes": num_classes}


def build(name: str, config: dict[str, Any]) -> Any:
    builder = getattr(tv_seg, name.split(":", 1)[1])
    return builder(weights=None, weights_backbone=None, **config)


register_family(Family((DEEPLAB,), tv_deeplab.DeepLabV3, deeplab_config, build))
register_family(Family((LRASPP,), tv_lraspp.LRASPP, lraspp_config, build))
