"""timm's EfficientNet / MobileNetV3 classes: read the configuration from an instance, build one.

Imported lazily by :mod:`torch_bridge.zoo._family` (timm is optional). The
architecture is the instance's ``pretrained_cfg["architecture"]`` (set by
``timm.create_model``), which must be one of
:data:`jaxdsc.models.timm_efficientnet.ARCHS`; ``num_classes``, ``in_chans``
and ``drop_rate`` are attributes of the instance, ``drop_path_rate`` and
``output_stride`` are recovered from the blocks' ``DropPath`` rates and
dilations. The configuration is only accepted once the tree it builds equals
the instance's (:func:`torch_bridge.zoo.check_structure`), so a model built
with other timm arguments (``bn_eps``, ``act_layer``, ``se_layer``, ...) or
modified afterwards is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import timm
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3

from jaxdsc.models.timm_efficientnet import ARCHS
from torch_bridge.errors import UnsupportedModelError
from torch_bridge.zoo._family import Family, register_family


def read_attr(source: str, what: str, get: Callable[[], Any]) -> Any:
    """``get()``, or :class:`UnsupportedModelError` saying which part of the tree was unreadable."""
    try:
        return get()
    except (AttributeError, IndexError, TypeError, KeyError) as e:
        raise UnsupportedModelError(f"{source}: cannot read {what} from the module tree ({e})") from None


def _drop_path_rate(src: str, m: Any) -> float:
    """timm gives block ``i`` of ``n`` the rate ``drop_path_rate * i / n`` (``nn.Identity`` for 0);
    recover ``drop_path_rate`` from the last block and check it rebuilds every rate exactly."""
    blocks = read_attr(src, "blocks", lambda: [b for stage in m.blocks for b in stage])
    rates = [float(getattr(b.drop_path, "drop_prob", 0.0)) for b in blocks]
    n = len(rates)
    if n < 2 or rates[-1] == 0.0:
        return 0.0
    guess = rates[-1] * n / (n - 1)
    for cand in (guess, *np.nextafter(guess, [0.0, 2.0]).tolist()):
        if all(cand * i / n == r for i, r in enumerate(rates)):
            return float(cand)
    raise UnsupportedModelError(
        f"{src}: the blocks' DropPath rates {rates} are not timm's drop_path_rate * i / {n} for any rate")


def _output_stride(src: str, m: Any) -> int:
    """32 divided by the largest dilation timm put in the blocks (it dilates instead of striding)."""
    dil = read_attr(src, "dilations", lambda: [c.dilation[0] for c in m.blocks.modules()
                                              if hasattr(c, "dilation") and hasattr(c, "weight")])
    d = max(dil, default=1)
    if 32 % d:
        raise UnsupportedModelError(f"{src}: dilation {d} in the blocks is not one timm's output_stride gives")
    return 32 // d


def timm_config(m: Any) -> tuple[str, dict[str, Any]]:
    src = f"timm {type(m).__name__} (torch)"
    arch = read_attr(src, 'pretrained_cfg["architecture"]', lambda: m.pretrained_cfg["architecture"])
    cls = "efficientnet" if type(m) is EfficientNet else "mobilenetv3"
    if arch not in ARCHS or ARCHS[arch].cls != cls:
        names = sorted(n for n, a in ARCHS.items() if a.cls == cls)
        raise UnsupportedModelError(f"{src}: architecture {arch!r} is not supported; supported: {names}")
    name, src = f"timm:{arch}", f"timm:{arch} (torch)"
    config = {
        "num_classes": int(read_attr(src, "num_classes", lambda: m.num_classes)),
        "in_chans": int(read_attr(src, "in_chans (conv_stem)", lambda: m.conv_stem.in_channels)),
        "drop_rate": float(read_attr(src, "drop_rate", lambda: m.drop_rate)),
        "drop_path_rate": _drop_path_rate(src, m),
    }
    if cls == "efficientnet":
        config["output_stride"] = _output_stride(src, m)
    return name, config


def build_timm(name: str, config: dict[str, Any]) -> Any:
    return timm.create_model(name.split(":", 1)[1], pretrained=False, **config)


def _names(cls: str) -> tuple[str, ...]:
    return tuple(f"timm:{n}" for n, a in ARCHS.items() if a.cls == cls)


register_family(Family(_names("efficientnet"), EfficientNet, timm_config, build_timm))
register_family(Family(_names("mobilenetv3"), MobileNetV3, timm_config, build_timm))
