"""Models built from jaxdsc layers (Flax NNX, channels-last).

``create(name, *, rngs, **kwargs)`` builds any registered model by its
origin-prefixed name (``list_models()`` lists them); the classes are also
importable directly.
"""

from jaxdsc.models._registry import create, get_builder, list_models, register_model
from jaxdsc.models.dscnet import CIFAR10_MEAN, CIFAR10_STD, BlockSpec, DSCNet, block_plan
from jaxdsc.models.timm_xception import XceptionAligned

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BlockSpec",
    "DSCNet",
    "XceptionAligned",
    "block_plan",
    "create",
    "get_builder",
    "list_models",
    "register_model",
]
