"""PyTorch twin of :class:`jaxdsc.models.DeepLabV3Plus` (NCHW), re-exported by :mod:`torch_bridge.nn`.

The backbone is the upstream model itself (a timm / torchvision instance, built by
its zoo family or passed in, e.g. with pretrained weights); the head has the JAX
model's module names, so the two state dicts have the same keys and
``torch_bridge.to_torch`` / ``from_torch`` / ``save`` / ``load`` convert exactly.
The backbone's multi-scale maps are taken as the JAX model's ``features(x)`` takes
them: timm's ``forward_intermediates(x, intermediates_only=True)``; for a
torchvision classifier, the output of each ``features`` item just before a
downsampling, and of its last item.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jaxdsc.models.deeplabv3plus import aspp_rates, backbone_kwargs_for

__all__ = ["DeepLabV3Plus"]


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SepConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_pw(self.conv_pw(F.relu(self.bn_dw(self.conv_dw(x))))))


def _conv3x3(cin: int, cout: int, dilation: int, separable: bool) -> nn.Module:
    return SepConvBNReLU(cin, cout, dilation) if separable else ConvBNReLU(cin, cout, 3, dilation)


def _resize(x: torch.Tensor, size: Any) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ASPPPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = ConvBNReLU(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.block(F.adaptive_avg_pool2d(x, 1)), x.shape[-2:])


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], separable: bool, dropout: float):
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(cin, cout)]
                                      + [_conv3x3(cin, cout, r, separable) for r in rates])
        self.pooling = ASPPPooling(cin, cout)
        self.project = ConvBNReLU(5 * cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(torch.cat([b(x) for b in self.branches] + [self.pooling(x)], dim=1))
        return y if self.dropout is None else self.dropout(y)


class Decoder(nn.Module):
    def __init__(self, low_ch: int, aspp_ch: int, low_out: int, ch: int, num_classes: int, separable: bool):
        super().__init__()
        self.reduce = ConvBNReLU(low_ch, low_out)
        self.fuse = nn.ModuleList([_conv3x3(aspp_ch + low_out, ch, 1, separable), _conv3x3(ch, ch, 1, separable)])
        self.classifier = nn.Conv2d(ch, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.reduce(low)
        y = torch.cat([_resize(high, low.shape[-2:]), low], dim=1)
        for layer in self.fuse:
            y = layer(y)
        return self.classifier(y)


def _sequential_taps(backbone: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Indices of ``backbone.features`` items whose output is a feature map (see the module doc)."""
    sizes = []
    for layer in backbone.features:
        x = layer(x)
        sizes.append(x.shape[-1])
    n = len(sizes)
    return tuple(i for i in range(n) if i + 1 == n or sizes[i + 1] < sizes[i])


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on an upstream backbone: ``(N, C, H, W)`` -> logits ``(N, num_classes, H, W)``.

    Arguments as :class:`jaxdsc.models.DeepLabV3Plus`; ``backbone`` may also be an upstream
    instance (e.g. a pretrained ``timm.create_model("xception65", num_classes=0,
    output_stride=16, pretrained=True)``), whose name and kwargs its zoo family reads.
    """

    def __init__(self, backbone: str | nn.Module = "timm:xception65",
                 backbone_kwargs: dict[str, Any] | None = None, num_classes: int = 21,
                 output_stride: int = 16, separable_aspp: bool = True, aspp_channels: int = 256,
                 low_level_channels: int = 48, dropout: float = 0.1):
        super().__init__()
        from torch_bridge.zoo._family import family_for_name, family_for_torch

        rates = aspp_rates(output_stride)
        if isinstance(backbone, nn.Module):
            family = family_for_torch(backbone)
            if family is None:
                raise ValueError(f"backbone: no zoo family serves {type(backbone).__qualname__}")
            name, kwargs = family.config_from_torch(backbone)
            if backbone_kwargs is not None and dict(backbone_kwargs) != kwargs:
                raise ValueError(f"backbone_kwargs {backbone_kwargs} disagree with the instance's {kwargs}")
            self.backbone = backbone
        elif isinstance(backbone, str):
            name, kwargs = backbone, backbone_kwargs_for(backbone, backbone_kwargs, output_stride)
            self.backbone = family_for_name(name).build_torch(name, dict(kwargs))
        else:
            raise TypeError(f"backbone must be a model name or an upstream nn.Module, got {type(backbone).__name__}")
        self.config = dict(backbone=name, backbone_kwargs=kwargs, num_classes=int(num_classes),
                           output_stride=int(output_stride), separable_aspp=bool(separable_aspp),
                           aspp_channels=int(aspp_channels), low_level_channels=int(low_level_channels),
                           dropout=float(dropout))
        self._timm = hasattr(self.backbone, "forward_intermediates")
        if not self._timm and not isinstance(getattr(self.backbone, "features", None), nn.Sequential):
            raise ValueError(f"backbone {name!r} has neither forward_intermediates nor a features Sequential")
        meta = self._feature_meta(int(kwargs.get("in_chans", 3)))
        high_ch, high_stride = meta[-1]
        if high_stride != output_stride:
            raise ValueError(f"output_stride={output_stride} but backbone {name!r} with {kwargs} ends at "
                             f"stride {high_stride}; pass output_stride={high_stride}")
        lows = [i for i, (_, s) in enumerate(meta) if s == 4]
        if not lows:
            raise ValueError(f"backbone {name!r} has no feature map at stride 4 (strides {meta})")
        self.low_index = lows[-1]
        self.aspp = ASPP(high_ch, aspp_channels, rates, separable_aspp, dropout)
        self.decoder = Decoder(meta[self.low_index][0], aspp_channels, low_level_channels, aspp_channels,
                               num_classes, separable_aspp)

    @torch.no_grad()
    def _feature_meta(self, in_chans: int) -> list[tuple[int, int]]:
        p = next(self.backbone.parameters())
        x = torch.zeros(1, in_chans, 64, 64, device=p.device, dtype=p.dtype)
        was = self.backbone.training
        self.backbone.eval()  # no statistics update
        try:
            if not self._timm:
                self._taps = _sequential_taps(self.backbone, x)
            maps = self.features(x)
        finally:
            self.backbone.train(was)
        return [(int(m.shape[1]), 64 // int(m.shape[-1])) for m in maps]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's multi-scale maps (NCHW), as the JAX backbone's ``features(x)``."""
        if self._timm:
            return list(self.backbone.forward_intermediates(x, intermediates_only=True))
        out = []
        for i, layer in enumerate(self.backbone.features):
            x = layer(x)
            if i in self._taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        y = self.decoder(self.aspp(feats[-1]), feats[self.low_index])
        return _resize(y, x.shape[-2:])
