"""Refuse upstream instances whose module tree differs from what their configuration builds.

The configuration read from an instance is only trusted once a reference built from
it (on the ``meta`` device) has the same tree: the same submodule paths, each of the
same class, and every leaf with the same settings (its ``repr``: channels, kernel,
stride, padding, dilation, groups, bias, eps, momentum, dropout p...). A replaced
activation, a conv with other ``groups``, an added or removed layer: all refused,
naming the path.
"""

from __future__ import annotations

import re
from typing import Any

from torch_bridge.errors import UnsupportedModelError

_INPLACE = re.compile(r",?\s*inplace=(True|False)")


def describe(module: Any) -> str:
    """A leaf as its ``repr`` (``inplace`` dropped: it does not change results); others by class."""
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if any(True for _ in module.children()):
        # A module with children may still hold settings of its own (timm's BatchNormAct2d is a
        # BatchNorm2d with an `act` child: eps and momentum are in its extra_repr).
        own = _INPLACE.sub("", module.extra_repr())
        return f"{cls}: {own}" if own else cls
    return f"{cls}: {_INPLACE.sub('', repr(module)).replace('(, ', '(')}"


def check_structure(module: Any, reference: Any, *, source: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``module``'s tree equals ``reference``'s."""
    got = dict(module.named_modules())
    expected = dict(reference.named_modules())
    for path, ref in expected.items():
        where = f"module {path!r}" if path else "the root module"
        if path not in got:
            raise UnsupportedModelError(f"{source}: {where} is missing; expected {describe(ref)}")
        found, want = describe(got[path]), describe(ref)
        if type(got[path]) is not type(ref) or found != want:
            raise UnsupportedModelError(f"{source}: {where} is {found}; expected {want}")
    extra = [p for p in got if p not in expected]
    if extra:
        raise UnsupportedModelError(
            f"{source}: unexpected module(s) {', '.join(map(repr, extra[:5]))} "
            f"({describe(got[extra[0]])}); the configuration read from the instance does not build them"
        )
