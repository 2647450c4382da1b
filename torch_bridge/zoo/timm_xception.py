"""timm's aligned Xception family (``xception41/65/71``, ``xception41p/65p``).

Imported lazily by :mod:`torch_bridge.zoo._family` (timm is optional). The
architecture comes from ``pretrained_cfg["architecture"]`` (or, for an instance
built without one, from its block count and pre-activation layout); ``num_classes``,
``in_chans`` and ``drop_rate`` from the instance; ``output_stride`` from the
dilation of the last block (1, 2, 4 -> 32, 16, 8); ``drop_path_rate`` from the last
block's ``DropPath`` (timm's linear rule gives it the full rate). The bridge then
checks the whole tree against the one this configuration builds.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import xception_aligned as tx

from jaxdsc.models.timm_xception import ARCHS
from torch_bridge.errors import UnsupportedModelError
from torch_bridge.zoo._family import Family, register_family

NAMES = tuple(f"timm:{a}" for a in ARCHS)
_OUTPUT_STRIDE = {1: 32, 2: 16, 4: 8}


def _arch(m: Any, src: str) -> str:
    arch = (getattr(m, "pretrained_cfg", None) or {}).get("architecture")
    if arch in ARCHS:
        return arch
    preact = isinstance(m.blocks[0], tx.PreXceptionModule)
    n = len(m.blocks)
    first_out = [b.out_channels for b in m.blocks][:5]
    for name, cfg in ARCHS.items():
        outs = [c if isinstance(c, int) else c[-1] for _, c, _ in cfg["blocks"]][:5]
        if cfg["preact"] == preact and len(cfg["blocks"]) == n and outs == first_out:
            return name
    raise UnsupportedModelError(
        f"{src}: architecture {arch!r} with {n} blocks (preact={preact}) is none of {sorted(ARCHS)}")


def config_from_torch(m: Any) -> tuple[str, dict[str, Any]]:
    src = "timm XceptionAligned (torch)"
    try:
        arch = _arch(m, src)
        last = m.blocks[-1]
        dilation = int(last.stack.conv1.conv_dw.dilation[0])
        dp = last.drop_path
        config = dict(
            num_classes=int(m.num_classes), in_chans=int(m.in_chans),
            output_stride=_OUTPUT_STRIDE.get(dilation, -1), drop_rate=float(m.drop_rate),
            drop_path_rate=0.0 if dp is None else float(dp.drop_prob),
        )
    except (AttributeError, IndexError, TypeError, KeyError) as e:
        raise UnsupportedModelError(f"{src}: cannot read its configuration from the module tree ({e})") from None
    if config["output_stride"] < 0:
        raise UnsupportedModelError(f"{src}: last block dilation {dilation}, expected 1, 2 or 4")
    return f"timm:{arch}", config


def build_torch(name: str, config: dict[str, Any]) -> torch.nn.Module:
    arch = name.removeprefix("timm:")
    if arch not in ARCHS:
        raise UnsupportedModelError(f"unknown Xception name {name!r}; expected one of {list(NAMES)}")
    return timm.create_model(arch, pretrained=False, **config)


register_family(Family(NAMES, tx.XceptionAligned, config_from_torch, build_torch))
