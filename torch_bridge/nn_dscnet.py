"""PyTorch twin of :class:`jaxdsc.models.DSCNet` (channels-first ``(N, C, H, W)``).

Same submodule names as the JAX model (``normalize``, ``stem``, ``blocks.i``,
``head``) and the same block plan (:func:`jaxdsc.models.block_plan`), so state
dicts convert through the generic walker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jaxdsc import _checks
from jaxdsc.models import CIFAR10_MEAN, CIFAR10_STD, block_plan, stage_config
from jaxdsc.models.dscnet import check_depth, check_kernel_size
from torch_bridge.nn import ConvBlock, Normalize, SeparableBlock, _check_activation


class DSCNet(nn.Module):
    """Twin of ``jaxdsc.models.DSCNet``: takes ``(N, C, H, W)`` images in ``[0, 1]``, returns logits."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        width: int | None = None,
        depth: int | Sequence[int] = 2,
        widths: Sequence[int] | None = None,
        strides: Sequence[int] = (1, 2, 1),
        dilations: Sequence[int] = (2, 4),
        kernel_size: int = 3,
        stem_width: int | None = None,
        activation: str = "relu",
        se_ratio: float = 0.0,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.width, self.widths, self.strides, self.dilations = stage_config(width, widths, strides, dilations)
        self.depth = check_depth(depth)
        self.kernel_size = check_kernel_size(kernel_size)
        self.stem_width = self.width if stem_width is None else _checks.positive_int("stem_width", stem_width)
        self.activation = _check_activation("activation", activation)
        self.se_ratio = _checks.number("se_ratio", se_ratio, low=0.0, high=1.0)
        self.momentum, self.eps = momentum, eps
        if in_channels == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = (0.5,) * in_channels, (0.5,) * in_channels
        common = dict(activation=activation, momentum=momentum, eps=eps)
        self.normalize = Normalize(in_channels, mean, std)
        self.stem = ConvBlock(in_channels, self.stem_width, 3, **common)
        self.blocks = nn.ModuleList([
            SeparableBlock(b.in_features, b.out_features, self.kernel_size, stride=b.stride, dilation=b.dilation,
                           residual=b.in_features == b.out_features and b.stride == 1, se_ratio=self.se_ratio,
                           **common)
            for b in block_plan(self.widths, self.depth, self.dilations, self.strides, self.stem_width)
        ])
        self.head = nn.Linear(self.widths[2], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.normalize(x))
        for block in self.blocks:
            h = block(h)
        # As the JAX model: pool low precision in float32, keep float64 as float64.
        return h.to(torch.promote_types(h.dtype, torch.float32)).mean(dim=tuple(range(2, h.dim())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        # The head runs in the features' dtype (a bf16 head upcast), as nnx.Linear promotes.
        weight, bias = self.head.weight, self.head.bias
        return F.linear(feats, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype))
