"""torchvision's MobileNetV2 / V3 families: read the configuration from an instance, build one.

Imported lazily by :mod:`torch_bridge.zoo._family` (torchvision is optional). The
configuration is read from the module tree (channel counts, dropout, classes); a
configuration is only accepted once the tree it builds equals the instance's
(:func:`torch_bridge.zoo.check_structure`), so anything not read here is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torchvision
from torchvision.models import mobilenetv2 as tv_mbv2
from torchvision.models import mobilenetv3 as tv_mbv3

from jaxdsc.models._common import make_divisible
from jaxdsc.models.torchvision_mobilenetv2 import DEFAULT_SETTING as MBV2_SETTING
from jaxdsc.models.torchvision_mobilenetv3 import ARCHS as MBV3_ARCHS
from jaxdsc.models.torchvision_mobilenetv3 import block_plan as mbv3_plan
from torch_bridge.errors import UnsupportedModelError
from torch_bridge.zoo._family import Family, register_family

COMMON_WIDTHS = (1.0, 0.75, 0.5, 0.35, 0.25, 1.3, 1.4, 1.5, 2.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9,
                 1.1, 1.2, 1.25, 1.75)


def read_attr(source: str, what: str, get: Callable[[], Any]) -> Any:
    """``get()``, or :class:`UnsupportedModelError` saying which part of the tree was unreadable."""
    try:
        return get()
    except (AttributeError, IndexError, TypeError, KeyError) as e:
        raise UnsupportedModelError(f"{source}: cannot read {what} from the module tree ({e})") from None


def infer_width(source: str, channels: Callable[[float], list[int]], actual: list[int],
                estimates: Iterable[float]) -> float:
    """The width multiplier whose channel plan ``channels(w)`` equals ``actual``.

    Common multipliers are tried first, then the ratios the channel counts suggest; several
    multipliers can build the same tree, and any of them converts exactly.
    """
    candidates = list(COMMON_WIDTHS) + sorted({round(e, 6) for e in estimates if e > 0})
    for w in candidates:
        if channels(w) == actual:
            return float(w)
    raise UnsupportedModelError(
        f"{source}: no width_mult builds the channel counts {actual} "
        f"(a custom inverted_residual_setting or a modified network is not supported)"
    )


# ---------------------------------------------------------------- MobileNetV2
def mbv2_channels(width_mult: float, round_nearest: int = 8) -> list[int]:
    """Stem, every block's output and the head's channels of torchvision's MobileNetV2."""
    out = [make_divisible(32 * width_mult, round_nearest)]
    for _, c, n, _ in MBV2_SETTING:
        out += [make_divisible(c * width_mult, round_nearest)] * n
    return [*out, make_divisible(1280 * max(1.0, width_mult), round_nearest)]


def mbv2_config(m: Any) -> tuple[str, dict[str, Any]]:
    name = "torchvision:mobilenet_v2"
    src = f"{name} (torch)"
    feats = read_attr(src, "features", lambda: list(m.features))
    actual = read_attr(src, "channels", lambda: [feats[0][0].out_channels]
                       + [f.out_channels for f in feats[1:-1]] + [feats[-1][0].out_channels])
    num_classes = read_attr(src, "num_classes (classifier.1)", lambda: m.classifier[1].out_features)
    dropout = read_attr(src, "dropout (classifier.0)", lambda: float(m.classifier[0].p))
    if len(actual) != len(mbv2_channels(1.0)):
        raise UnsupportedModelError(
            f"{src}: {len(actual) - 2} inverted residual blocks, expected {len(mbv2_channels(1.0)) - 2} "
            "(only torchvision's default inverted_residual_setting is read from an instance)")
    for round_nearest in (8, 1, 2, 4, 16, 32):
        estimates = [a / c for a, c in zip(actual, mbv2_channels(1.0, 1), strict=True)]
        try:
            w = infer_width(src, lambda w, r=round_nearest: mbv2_channels(w, r), actual, estimates)
        except UnsupportedModelError:
            continue
        return name, {"num_classes": num_classes, "width_mult": w, "inverted_residual_setting": None,
                      "round_nearest": round_nearest, "dropout": dropout}
    raise UnsupportedModelError(f"{src}: no width_mult / round_nearest builds the channel counts {actual}")


def build_mbv2(name: str, config: dict[str, Any]) -> Any:
    return torchvision.models.mobilenet_v2(weights=None, **config)


register_family(Family(("torchvision:mobilenet_v2",), tv_mbv2.MobileNetV2, mbv2_config, build_mbv2))



# ---------------------------------------------------------------- MobileNetV3
def mbv3_channels(arch: str, width_mult: float, reduced_tail: bool) -> list[int]:
    """Every block's expanded and output channels, then ``last_channel``."""
    plan, last = mbv3_plan(arch, width_mult, reduced_tail, False)
    return [c for b in plan for c in (b.expanded_channels, b.out_channels)] + [last]


def mbv3_config(m: Any) -> tuple[str, dict[str, Any]]:
    src = "torchvision MobileNetV3 (torch)"
    feats = read_attr(src, "features", lambda: list(m.features))
    blocks = feats[1:-1]
    arch = next((a for a, (rows, _) in MBV3_ARCHS.items() if len(rows) == len(blocks)), None)
    if arch is None:
        raise UnsupportedModelError(f"{src}: {len(blocks)} inverted residual blocks, expected 15 "
                                    f"(mobilenet_v3_large) or 11 (mobilenet_v3_small)")
    src = f"torchvision:{arch} (torch)"
    actual = read_attr(src, "channels", lambda: [c for b in blocks for c in (
        b.block[-1][0].in_channels, b.out_channels)]
        + [m.classifier[0].out_features])
    dilated = read_attr(src, "dilation", lambda: any(
        getattr(c, "dilation", (1, 1)) != (1, 1) for c in m.features.modules()))
    num_classes = read_attr(src, "num_classes (classifier.3)", lambda: m.classifier[3].out_features)
    dropout = read_attr(src, "dropout (classifier.2)", lambda: float(m.classifier[2].p))
    full = mbv3_channels(arch, 1.0, False)
    for reduced_tail in (False, True):
        try:
            w = infer_width(src, lambda w, r=reduced_tail: mbv3_channels(arch, w, r), actual,
                            [a / c for a, c in zip(actual, full, strict=True)])
        except UnsupportedModelError:
            continue
        return f"torchvision:{arch}", {"width_mult": w, "reduced_tail": reduced_tail, "dilated": dilated,
                                       "num_classes": num_classes, "dropout": dropout}
    raise UnsupportedModelError(f"{src}: no width_mult / reduced_tail builds the channel counts {actual}")


def build_mbv3(name: str, config: dict[str, Any]) -> Any:
    return getattr(torchvision.models, name.split(":", 1)[1])(weights=None, **config)


register_family(Family(("torchvision:mobilenet_v3_large", "torchvision:mobilenet_v3_small"),
                       tv_mbv3.MobileNetV3, mbv3_config, build_mbv3))
