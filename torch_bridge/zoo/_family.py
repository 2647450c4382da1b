"""The zoo's registry of upstream model families (torchvision / timm / our twins).

A :class:`Family` tells the bridge how to recognise an upstream instance
(``type(m) is torch_cls``), how to read its constructor arguments from the
instance, and how to build one from a name and those arguments. The JAX side is
built by ``jaxdsc.models.create(name, **config)``; weights move through the
generic walker of :mod:`torch_bridge.convert`, so key, shape and dtype checks are
shared with every other module.

Family modules import torchvision / timm at their top; they are imported lazily,
on the first lookup, and a family whose upstream library is missing is simply
not available (``family_for_name`` says which import failed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch_bridge.errors import UnsupportedModelError

FAMILY_MODULES: tuple[str, ...] = (
    "torch_bridge.zoo.torchvision_mobilenet",
    "torch_bridge.zoo.torchvision_efficientnet",
    "torch_bridge.zoo.torchvision_segmentation",
    "torch_bridge.zoo.timm_efficientnet",
    "torch_bridge.zoo.timm_xception",
    "torch_bridge.zoo.deeplabv3plus",
)
"""Modules that register families when imported (one per family file)."""


@dataclass(frozen=True)
class Family:
    """One upstream model class and the ``create`` names it serves.

    ``config_from_torch(m)`` returns ``(name, kwargs)`` read from the instance (JSON values,
    the upstream constructor's names); it raises :class:`UnsupportedModelError` when it cannot
    read them. ``build_torch(name, kwargs)`` builds the upstream model (random init; the
    bridge calls it under ``torch.device("meta")`` when only shapes are needed).
    """

    names: tuple[str, ...]
    torch_cls: type
    config_from_torch: Callable[[Any], tuple[str, dict[str, Any]]]
    build_torch: Callable[[str, dict[str, Any]], Any]


_BY_NAME: dict[str, Family] = {}
_BY_CLASS: dict[type, Family] = {}
_FAILED: dict[str, str] = {}  # family module -> why it could not be imported
_loaded = False


def register_family(family: Family) -> Family:
    """Make ``family`` known to the bridge; its names must be new."""
    for name in family.names:
        if name in _BY_NAME and _BY_NAME[name] is not family:
            raise ValueError(f"zoo name {name!r} is already served by another family")
    if family.torch_cls in _BY_CLASS and _BY_CLASS[family.torch_cls] is not family:
        raise ValueError(f"upstream class {family.torch_cls.__qualname__} already has a family")
    for name in family.names:
        _BY_NAME[name] = family
    _BY_CLASS[family.torch_cls] = family
    return family


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:  # torchvision / timm not installed: those families are absent
            _FAILED[module] = f"{type(e).__name__}: {e}"


def is_zoo_name(name: object) -> bool:
    """Zoo names carry their origin (``"torchvision:mobilenet_v2"``); class names do not."""
    return isinstance(name, str) and ":" in name


def family_for_torch(module: Any) -> Family | None:
    """The family of an upstream instance (exact class match), or None."""
    _load()
    return _BY_CLASS.get(type(module))


def family_for_name(name: str) -> Family:
    """The family serving ``name``; :class:`UnsupportedModelError` naming the known ones otherwise."""
    _load()
    if name in _BY_NAME:
        return _BY_NAME[name]
    missing = f"; families not available: {_FAILED}" if _FAILED else ""
    raise UnsupportedModelError(
        f"no bridge family serves the model name {name!r}; supported: {sorted(_BY_NAME)}{missing}"
    )


def zoo_names() -> list[str]:
    """Every name the bridge converts, sorted."""
    _load()
    return sorted(_BY_NAME)
