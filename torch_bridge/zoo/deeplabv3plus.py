"""Our DeepLabV3+ (``jaxdsc:deeplabv3plus``): the JAX model and its twin :class:`torch_bridge.nn.DeepLabV3Plus`.

The twin's configuration is the one it was built with (``m.config``); the backbone
inside it is an upstream instance whose own family read its name and kwargs. The
bridge then checks the whole tree against the one this configuration builds.
"""

from __future__ import annotations

from typing import Any

from torch_bridge.errors import UnsupportedModelError
from torch_bridge.nn_deeplab import DeepLabV3Plus
from torch_bridge.zoo._family import Family, register_family

NAME = "jaxdsc:deeplabv3plus"


def config_from_torch(m: Any) -> tuple[str, dict[str, Any]]:
    config = getattr(m, "config", None)
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{NAME} (torch): the instance has no config dict")
    return NAME, dict(config)


def build_torch(name: str, config: dict[str, Any]) -> DeepLabV3Plus:
    if name != NAME:
        raise UnsupportedModelError(f"unknown name {name!r}; expected {NAME!r}")
    return DeepLabV3Plus(**config)


register_family(Family((NAME,), DeepLabV3Plus, config_from_torch, build_torch))
