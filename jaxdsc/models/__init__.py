"""Models built from jaxdsc layers (Flax NNX, channels-last).

``create(name, *, rngs, **kwargs)`` builds any registered model by its
origin-prefixed name (``list_models()`` lists them); the classes are also
importable directly.
"""

from jaxdsc.models._registry import create, get_builder, list_models, register_model
from jaxdsc.models.deeplabv3plus import DeepLabV3Plus
from jaxdsc.models.dscnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BlockSpec,
    DSCNet,
    block_plan,
    stage_config,
)
from jaxdsc.models.tcn import (
    TCN,
    CausalConv,
    TemporalBlock,
    WeightNormConv,
    WeightNormDepthwiseConv,
    WeightNormPointwiseConv,
)
from jaxdsc.models.timm_efficientnet import TimmEfficientNet, TimmMobileNetV3
from jaxdsc.models.timm_xception import XceptionAligned
from jaxdsc.models.torchvision_efficientnet import EfficientNet
from jaxdsc.models.torchvision_mobilenetv2 import MobileNetV2
from jaxdsc.models.torchvision_mobilenetv3 import MobileNetV3
from jaxdsc.models.torchvision_segmentation import LRASPP, DeepLabV3
from jaxdsc.models.unet import UNet

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "LRASPP",
    "TCN",
    "BlockSpec",
    "CausalConv",
    "DSCNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "EfficientNet",
    "MobileNetV2",
    "MobileNetV3",
    "TemporalBlock",
    "TimmEfficientNet",
    "TimmMobileNetV3",
    "UNet",
    "WeightNormConv",
    "WeightNormDepthwiseConv",
    "WeightNormPointwiseConv",
    "XceptionAligned",
    "block_plan",
    "create",
    "get_builder",
    "list_models",
    "register_model",
    "stage_config",
]
