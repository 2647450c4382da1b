"""PyTorch twin of :class:`jaxdsc.models.UNet` (channels-first ``(N, C, H, W)``).

Same submodule names as the JAX model (``normalize``, ``encoder.i.j``,
``bottleneck.j``, ``decoder.k.j``, ``head``), so state dicts convert through
the generic walker; pooling (``-inf`` padding on the high side of odd sizes)
and nearest upsampling + cropping are exact copies of the JAX ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jaxdsc import _checks
from jaxdsc.models.unet import UNET_MEAN, UNET_STD, check_dilations
from torch_bridge.nn import ConvBlock, Normalize, PointwiseConv, SeparableBlock, _check_activation


def max_pool_ceil(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pool, stride 2; odd sizes round up (as ``jaxdsc.models.unet.max_pool_ceil``)."""
    pads = [v for n in reversed(x.shape[2:]) for v in (0, n % 2)]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 2, 2)


def upsample_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest 2x upsampling cropped to the spatial ``shape``."""
    x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x[:, :, : shape[0], : shape[1]]


class UNet(nn.Module):
    """Twin of ``jaxdsc.models.UNet``: ``(N, C, H, W)`` images in ``[0, 1]`` -> ``(N, classes, H, W)`` logits."""

    def __init__(
        self,
        num_classes: int = 2,
        *,
        in_channels: int = 3,
        width: int = 16,
        depth: int = 3,
        dilations: Sequence[int] = (2, 4),
        separable: bool = True,
        activation: str = "relu",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.width = _checks.positive_int("width", width)
        self.depth = _checks.positive_int("depth", depth)
        self.dilations = check_dilations(dilations)
        self.separable = _checks.boolean("separable", separable)
        self.activation = _check_activation("activation", activation)
        self.momentum, self.eps = momentum, eps
        common = dict(activation=activation, momentum=momentum, eps=eps)

        def block(cin: int, cout: int, dilation: int = 1) -> nn.Module:
            cls = SeparableBlock if separable else ConvBlock
            return cls(cin, cout, 3, dilation=dilation, **common)

        w = [width * 2**i for i in range(depth + 1)]
        self.normalize = Normalize(in_channels, (UNET_MEAN,) * in_channels, (UNET_STD,) * in_channels)
        self.encoder = nn.ModuleList(
            [nn.ModuleList([ConvBlock(in_channels, w[0], 3, **common), block(w[0], w[0])])]
            + [nn.ModuleList([block(w[i - 1], w[i]), block(w[i], w[i])]) for i in range(1, depth + 1)]
        )
        self.bottleneck = nn.ModuleList([block(w[depth], w[depth], d) for d in self.dilations])
        self.decoder = nn.ModuleList([
            nn.ModuleList([block(w[i] + w[i + 1], w[i]), block(w[i], w[i])])
            for i in reversed(range(depth))
        ])
        self.head = PointwiseConv(w[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normalize(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            if i:
                h = max_pool_ceil(h)
            for blk in stage:
                h = blk(h)
            skips.append(h)
        for blk in self.bottleneck:
            h = h + blk(h)
        for stage, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            h = torch.cat([skip, upsample_to(h, skip.shape[2:])], dim=1)
            for blk in stage:
                h = blk(h)
        return self.head(h)
