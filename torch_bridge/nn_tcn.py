"""PyTorch twin of ``jaxdsc.models.TCN`` (channels-first ``(N, C, T)``), re-exported by ``torch_bridge.nn``.

Weight norm is PyTorch's own ``torch.nn.utils.parametrizations.weight_norm``
(``dim=0``): a weight-normed conv keeps ``parametrizations.weight.original0``
(the gain ``g``, ``(out, 1, 1)``) and ``parametrizations.weight.original1``
(the direction ``v``) in its state dict, as any PyTorch user's
``weight_norm(nn.Conv1d(...))`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from jaxdsc import _checks
from torch_bridge.nn import Conv, DepthwiseConv, PointwiseConv, conv_nd

# As jaxdsc.models.tcn: convs keep PyTorch's default init (what locuslab/TCN effectively runs, its
# N(0, 0.01) draw being overwritten by weight_norm's hook); the downsample and linear weights N(0, 0.01).
_LINEAR_STD = 0.01
# The depthwise kernels: PyTorch's default scaled by sqrt(3) (jaxdsc.models.tcn.DEPTHWISE_INIT_GAIN says why).
_DEPTHWISE_INIT_GAIN = math.sqrt(3.0)


def _weight_norm_(module: nn.Module) -> None:
    """Parametrise the default-initialised ``weight`` as ``g * v / ||v||`` with ``g = ||v||``."""
    parametrizations.weight_norm(module, "weight", dim=0)


class WeightNormDepthwiseConv(DepthwiseConv):
    """Twin of ``jaxdsc.models.WeightNormDepthwiseConv``: a weight-normed :class:`DepthwiseConv`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _weight_norm_(self)


class WeightNormPointwiseConv(PointwiseConv):
    """Twin of ``jaxdsc.models.WeightNormPointwiseConv``: a weight-normed :class:`PointwiseConv`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _weight_norm_(self)


class WeightNormConv(Conv):
    """Twin of ``jaxdsc.models.WeightNormConv``: a weight-normed :class:`Conv`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _weight_norm_(self)


class CausalConv(nn.Module):
    """Twin of ``jaxdsc.models.CausalConv``: ``(N, in, T) -> (N, out, T)``, causal, dilated."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1,
                 separable: bool = True, weight_norm: bool = True):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        self.kernel_size = _checks.positive_int("kernel_size", kernel_size)
        self.dilation = _checks.positive_int("dilation", dilation)
        self.separable = _checks.boolean("separable", separable)
        self.weight_norm = _checks.boolean("weight_norm", weight_norm)
        k, d = (self.kernel_size,), (self.dilation,)
        if separable:
            dw_cls = WeightNormDepthwiseConv if weight_norm else DepthwiseConv
            pw_cls = WeightNormPointwiseConv if weight_norm else PointwiseConv
            self.depthwise = dw_cls(in_channels, k, padding="CAUSAL", dilation=d)
            with torch.no_grad():  # g and v both: the weight scales by the gain, g = ||v|| still holds
                weights = ([self.depthwise.parametrizations.weight.original0,
                            self.depthwise.parametrizations.weight.original1] if weight_norm
                           else [self.depthwise.weight])
                for w in weights:
                    w.mul_(_DEPTHWISE_INIT_GAIN)
            self.pointwise = pw_cls(in_channels, out_channels, num_spatial_dims=1)
            self.conv = None
        else:
            conv_cls = WeightNormConv if weight_norm else Conv
            self.depthwise = self.pointwise = None
            self.conv = conv_cls(in_channels, out_channels, k, padding="CAUSAL", dilation=d)

    def forward(self, x: torch.Tensor, dilation: int | None = None) -> torch.Tensor:
        """``dilation`` overrides the layer's (causal padding ``(k - 1) * dilation``), as the JAX layer's."""
        dilation = self.dilation if dilation is None else dilation
        pad = (((self.kernel_size - 1) * dilation, 0),)
        if self.conv is not None:
            return conv_nd(x, self.conv.weight, self.conv.bias, padding=pad, stride=(1,), dilation=(dilation,))
        dw = self.depthwise
        h = conv_nd(x, dw.weight, dw.bias, padding=pad, stride=(1,), dilation=(dilation,), groups=self.in_channels)
        return self.pointwise(h)


class TemporalBlock(nn.Module):
    """Twin of ``jaxdsc.models.TemporalBlock`` (dropout is ``F.dropout``, active in train mode)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int,
                 separable: bool = True, dense_conv1: bool = False, weight_norm: bool = True,
                 gated: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.separable, self.weight_norm = separable, weight_norm
        self.dense_conv1 = _checks.boolean("dense_conv1", dense_conv1)
        self.gated = _checks.boolean("gated", gated)
        self.dropout = dropout
        width = 2 * out_channels if gated else out_channels
        common = dict(dilation=dilation, weight_norm=weight_norm)
        self.conv1 = CausalConv(in_channels, width, kernel_size, separable=separable and not dense_conv1, **common)
        self.conv2 = CausalConv(out_channels, width, kernel_size, separable=separable, **common)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = PointwiseConv(in_channels, out_channels, num_spatial_dims=1)
            with torch.no_grad():
                nn.init.normal_(self.downsample.weight, 0.0, _LINEAR_STD)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return F.glu(h, dim=1) if self.gated else F.relu(h)

    def forward(self, x: torch.Tensor, dilation: int | None = None) -> torch.Tensor:
        h = F.dropout(self._act(self.conv1(x, dilation)), self.dropout, self.training)
        h = F.dropout(self._act(self.conv2(h, dilation)), self.dropout, self.training)
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(h + res)


class TCN(nn.Module):
    """Twin of ``jaxdsc.models.TCN``: ``(N, in_channels, T) -> (N, out_channels, T)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        *,
        kernel_size: int = 2,
        separable: bool = True,
        dense_stem: bool = False,
        dropout: float = 0.0,
        weight_norm: bool = True,
        gated: bool = False,
    ):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
        self.channels = tuple(_checks.positive_int(f"channels[{i}]", c) for i, c in enumerate(channels))
        self.kernel_size = _checks.positive_int("kernel_size", kernel_size)
        self.separable = _checks.boolean("separable", separable)
        self.dense_stem = _checks.boolean("dense_stem", dense_stem)
        self.weight_norm = _checks.boolean("weight_norm", weight_norm)
        self.gated = _checks.boolean("gated", gated)
        self.dropout = _checks.number("dropout", dropout, low=0.0, high=1.0)
        if self.dropout == 1.0:
            raise ValueError("dropout must be in [0, 1), got 1.0")
        widths = (self.in_channels, *self.channels)
        self.blocks = nn.ModuleList([
            TemporalBlock(widths[i], widths[i + 1], self.kernel_size, dilation=2**i, separable=separable,
                          dense_conv1=self.dense_stem and i == 0, weight_norm=weight_norm, gated=gated,
                          dropout=self.dropout)
            for i in range(len(self.channels))
        ])
        self.linear = nn.Linear(self.channels[-1], self.out_channels)
        with torch.no_grad():
            nn.init.normal_(self.linear.weight, 0.0, _LINEAR_STD)

    def _check(self, x: torch.Tensor, min_length: int = 0) -> None:
        if (not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != self.in_channels
                or x.shape[2] < min_length):
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, T{f' >= {min_length}' if min_length else ''}) "
                f"(channels first), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        h = x
        for block in self.blocks:
            h = block(h)
        return self.linear(h.transpose(1, 2)).transpose(1, 2)

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)[:, :, -1]`` ``(N, out_channels)``: level ``i`` on every ``2**i``-th step only, as
        ``jaxdsc.models.TCN.last``."""
        self._check(x, min_length=1)
        h, spacing = x, 1
        for block in self.blocks:
            r = block.dilation // spacing
            h = h[:, :, (h.shape[2] - 1) % r::r]
            spacing = block.dilation
            h = block(h, 1)
        return self.linear(h[:, :, -1])
