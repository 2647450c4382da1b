"""Model names -> builders: ``create(name, *, rngs, **kwargs)`` and ``list_models()``.

Names carry their origin as a prefix: ``"torchvision:mobilenet_v2"``,
``"timm:tf_efficientnet_b0"``, ``"jaxdsc:dscnet"``. A family module registers
its builders with :func:`register_model` when :mod:`jaxdsc.models` imports it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from flax import nnx

Builder = Callable[..., nnx.Module]

_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(*, rngs, **kwargs) -> nnx.Module`` under ``name``."""
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise ValueError(f"name must be 'origin:model', got {name!r}")

    def deco(builder: Builder) -> Builder:
        if name in _MODELS and _MODELS[name] is not builder:
            raise ValueError(f"model name {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return deco


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names; ``pattern`` (fnmatch, e.g. ``"timm:*"``) filters them."""
    import fnmatch

    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_builder(name: str) -> Builder:
    """The builder registered under ``name``; ``ValueError`` listing close matches otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        if not close:  # a bare name without its origin prefix still finds its entries
            close = [n for n in _MODELS if n.split(":", 1)[1] == name]
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model name {name!r}{hint} (list_models() lists all {len(_MODELS)})"
        ) from None


def create(name: str, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """Build the registered model ``name`` with ``kwargs`` (the upstream constructor arguments)."""
    return get_builder(name)(rngs=rngs, **kwargs)
