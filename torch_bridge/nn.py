"""PyTorch twins of the jaxdsc modules (channels-first ``(N, C, *spatial)``).

Each twin is named like its JAX module, takes PyTorch-style arguments
(``in_channels``, ``out_channels``, ``stride``, ``dilation``, ``bias``) and
computes exactly the same function, padding included: specs are resolved by
:func:`jaxdsc.padding.resolve_padding`, then applied with ``F.pad`` in the
right mode (or passed to the conv when they are symmetric zeros). Parameter
and buffer names are the standard PyTorch ones, so ``state_dict`` files load
into plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` users' code and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from jaxdsc import _checks
from jaxdsc.padding import PaddingLike, canonical_padding, resolve_padding
from jaxdsc.se import se_features

IntOrTuple = int | Sequence[int]
_SPATIAL_NAMES = ("kernel_size", "stride", "dilation")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "hard_swish": F.hardswish,
    "elu": F.elu,
    "leaky_relu": partial(F.leaky_relu, negative_slope=0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": F.hardsigmoid,
}


def _check_activation(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be an activation name or None, got {value!r} ({type(value).__name__})")
    if value not in TORCH_ACTIVATIONS:
        raise ValueError(f"{name} must be one of {sorted(TORCH_ACTIVATIONS)} or None, got {value!r}")
    return value


def _act(name: str | None, x: torch.Tensor) -> torch.Tensor:
    return x if name is None else TORCH_ACTIVATIONS[name](x)


def _check_input(x: object, *, rank: int, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    _checks.input_layout(tuple(x.shape), rank=rank, channels=channels, channels_last=False)


def conv_nd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    padding: str | tuple[tuple[int, int], ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv{1,2,3}d`` with a jaxdsc padding spec resolved for ``x``."""
    kernel_size = tuple(weight.shape[2:])
    pad = resolve_padding(padding, x.shape[2:], kernel_size, stride, dilation)
    symmetric = all(lo == hi for lo, hi in pad.pairs)
    conv_pad: tuple[int, ...] = tuple(lo for lo, _ in pad.pairs)
    if pad.mode != "constant" or not symmetric:
        # F.pad takes (lo, hi) pairs starting from the last dim.
        flat = [v for pair in reversed(pad.pairs) for v in pair]
        x = F.pad(x, flat, mode=pad.mode) if pad.mode != "constant" else F.pad(x, flat)
        conv_pad = (0,) * len(pad.pairs)
    return _CONV[len(kernel_size)](x, weight, bias, stride, conv_pad, dilation, groups)


def _init_conv_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # PyTorch's own default conv initialisation (kaiming_uniform with a=sqrt(5)).
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(bias, -bound, bound)


class DepthwiseConv(nn.Module):
    """Depthwise dilated conv (``groups=in_channels``), twin of ``jaxdsc.DepthwiseConv``.

    Shapes: ``(N, C, *spatial) -> (N, C * depth_multiplier, *out_spatial)``;
    weight ``(C * M, 1, *kernel_size)``.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: IntOrTuple,
        *,
        depth_multiplier: int = 1,
        stride: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        dilation: IntOrTuple = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.depth_multiplier = _checks.positive_int("depth_multiplier", depth_multiplier)
        self.kernel_size, self.stride, self.dilation = _checks.spatial_args(
            kernel_size, stride, dilation, names=_SPATIAL_NAMES
        )
        self.padding = canonical_padding(padding, len(self.kernel_size))
        _checks.boolean("bias", bias)
        self.out_channels = self.in_channels * self.depth_multiplier
        self.weight = nn.Parameter(torch.empty(self.out_channels, 1, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        _init_conv_(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, rank=len(self.kernel_size), channels=self.in_channels)
        return conv_nd(x, self.weight, self.bias, padding=self.padding, stride=self.stride,
                       dilation=self.dilation, groups=self.in_channels)


class PointwiseConv(nn.Module):
    """1x1 conv, twin of ``jaxdsc.PointwiseConv``; weight ``(out, in, 1, ...)``."""

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True, num_spatial_dims: int = 2):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        self.num_spatial_dims = _checks.positive_int("num_spatial_dims", num_spatial_dims)
        if self.num_spatial_dims > 3:
            raise ValueError(f"num_spatial_dims must be 1, 2 or 3, got {num_spatial_dims!r}")
        _checks.boolean("bias", bias)
        ones = (1,) * self.num_spatial_dims
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, *ones))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        _init_conv_(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, rank=self.num_spatial_dims, channels=self.in_channels)
        return _CONV[self.num_spatial_dims](x, self.weight, self.bias)


class SqueezeExcite(nn.Module):
    """``x * gate(expand(act(reduce(mean(x)))))``, twin of ``jaxdsc.SqueezeExcite``; 1x1 convs, biased."""

    def __init__(self, in_channels: int, rd_channels: int, *, activation: str = "relu", gate: str = "sigmoid",
                 num_spatial_dims: int = 2):
        super().__init__()
        self.activation = _check_activation("activation", activation)
        self.gate = _check_activation("gate", gate)
        self.reduce = PointwiseConv(in_channels, rd_channels, num_spatial_dims=num_spatial_dims)
        self.expand = PointwiseConv(rd_channels, in_channels, num_spatial_dims=num_spatial_dims)
        self.in_channels, self.rd_channels = self.reduce.in_channels, self.reduce.out_channels
        self.num_spatial_dims = self.reduce.num_spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, rank=self.num_spatial_dims, channels=self.in_channels)
        # As the JAX module: the mean in float32 at least.
        acc = torch.promote_types(x.dtype, torch.float32)
        s = x.to(acc).mean(dim=tuple(range(2, x.dim())), keepdim=True).to(x.dtype)
        s = self.expand(_act(self.activation, self.reduce(s)))
        return x * _act(self.gate, s).to(x.dtype)


class Conv(nn.Module):
    """Dense conv with jaxdsc padding specs, twin of ``jaxdsc.Conv``; weight ``(out, in, *k)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        *,
        stride: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        dilation: IntOrTuple = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.dilation = _checks.spatial_args(
            kernel_size, stride, dilation, names=_SPATIAL_NAMES
        )
        self.padding = canonical_padding(padding, len(self.kernel_size))
        _checks.boolean("bias", bias)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        _init_conv_(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, rank=len(self.kernel_size), channels=self.in_channels)
        return conv_nd(x, self.weight, self.bias, padding=self.padding, stride=self.stride,
                       dilation=self.dilation)


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm{1,2,3}d`` for any rank, twin of ``jaxdsc.BatchNorm``.

    ``momentum`` is PyTorch's (0.1 == Flax 0.9). State-dict keys are the
    standard ones, so ``nn.BatchNorm2d`` checkpoints load directly.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1):
        _checks.positive_int("num_features", num_features)
        _checks.number("momentum", momentum, low=0.0, high=1.0)
        _checks.number("eps", eps, low=0.0, high=math.inf, low_open=True)
        super().__init__(num_features, eps=eps, momentum=momentum)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # Same TypeError as the JAX module (torch itself raises NotImplementedError / AttributeError).
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {input.dtype}")
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"x must have shape (N, {self.num_features}, ...) (channels first), got {tuple(input.shape)}"
            )


class Normalize(nn.Module):
    """Fixed per-channel ``(x - mean) / std`` on channel axis 1, with buffers ``mean`` and ``std``."""

    def __init__(self, num_features: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.num_features = c = _checks.positive_int("num_features", num_features)
        mean = [0.0] * c if mean is None else list(mean)
        std = [1.0] * c if std is None else list(std)
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std must have num_features={c} entries, got {len(mean)} and {len(std)}")
        for i, s in enumerate(std):  # as jaxdsc.Normalize: a zero std would divide by zero
            _checks.number(f"std[{i}]", s, low=0.0, high=math.inf, low_open=True)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            hint = ""
            if x.dim() >= 3 and x.shape[-1] == self.num_features:
                hint = "; it looks like channels-last (NHWC) input, this layer expects NCHW"
            raise ValueError(
                f"x must have {self.num_features} channels on axis 1 (NCHW), got shape {tuple(x.shape)}{hint}"
            )
        view = (1, -1) + (1,) * (x.dim() - 2)
        return ((x - self.mean.view(view)) / self.std.view(view)).to(x.dtype)


class SeparableConv(nn.Module):
    """Depthwise then pointwise conv, twin of ``jaxdsc.SeparableConv`` (same options, torch names)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        *,
        stride: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        dilation: IntOrTuple = 1,
        depth_multiplier: int = 1,
        bias: bool = True,
        mid_norm: str | None = None,
        mid_activation: str | None = None,
        merge: str | None = None,
    ):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        self.mid_norm = _checks.choice("mid_norm", mid_norm, (None, "batch"))
        self.mid_activation = _check_activation("mid_activation", mid_activation)
        self.merge = _checks.choice("merge", merge, (None, "concat"))
        _checks.boolean("bias", bias)
        self.depthwise = DepthwiseConv(
            in_channels, kernel_size, depth_multiplier=depth_multiplier, stride=stride,
            padding=padding, dilation=dilation, bias=bias and mid_norm is None,
        )
        dw = self.depthwise
        self.kernel_size, self.stride, self.dilation = dw.kernel_size, dw.stride, dw.dilation
        self.padding, self.depth_multiplier = dw.padding, dw.depth_multiplier
        rank = len(self.kernel_size)
        self.norm = BatchNorm(dw.out_channels) if mid_norm else None
        self.pointwise = PointwiseConv(dw.out_channels, out_channels, bias=bias, num_spatial_dims=rank)
        self.project = (
            PointwiseConv(dw.out_channels + out_channels, out_channels, bias=bias, num_spatial_dims=rank)
            if merge == "concat"
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x)
        if self.norm is not None:
            h = self.norm(h)
        h = _act(self.mid_activation, h)
        y = self.pointwise(h)
        if self.project is not None:
            y = self.project(torch.cat([h, y], dim=1))
        return y


class SeparableBlock(nn.Module):
    """``depthwise -> BN -> act [-> SE] -> pointwise -> BN -> act`` (+ input), twin of ``jaxdsc.SeparableBlock``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        *,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        depth_multiplier: int = 1,
        padding: PaddingLike = "SAME",
        activation: str | None = "relu",
        residual: bool = False,
        se_ratio: float = 0.0,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.activation = _check_activation("activation", activation)
        self.residual = _checks.boolean("residual", residual)
        self.se_ratio = _checks.number("se_ratio", se_ratio, low=0.0, high=1.0)
        self.depthwise = DepthwiseConv(
            in_channels, kernel_size, depth_multiplier=depth_multiplier, stride=stride,
            padding=padding, dilation=dilation, bias=False,
        )
        dw = self.depthwise
        self.in_channels, self.out_channels = dw.in_channels, _checks.positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.dilation = dw.kernel_size, dw.stride, dw.dilation
        self.padding, self.depth_multiplier = dw.padding, dw.depth_multiplier
        if residual and (self.in_channels != self.out_channels or any(s != 1 for s in self.stride)):
            raise ValueError(
                "residual=True needs in_channels == out_channels and stride of 1, got "
                f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"
            )
        self.bn_dw = BatchNorm(dw.out_channels, eps=eps, momentum=momentum)
        self.se = SqueezeExcite(dw.out_channels, se_features(dw.out_channels, self.se_ratio),
                                num_spatial_dims=len(self.kernel_size)) if self.se_ratio else None
        self.pointwise = PointwiseConv(dw.out_channels, out_channels, bias=False,
                                       num_spatial_dims=len(self.kernel_size))
        self.bn_pw = BatchNorm(self.out_channels, eps=eps, momentum=momentum)
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _act(self.activation, self.bn_dw(self.depthwise(x)))
        if self.se is not None:
            h = self.se(h)
        y = _act(self.activation, self.bn_pw(self.pointwise(h)))
        if self.residual:
            if y.shape != x.shape:
                raise ValueError(
                    f"residual=True needs the block to keep the input shape, got input {tuple(x.shape)} "
                    f"and output {tuple(y.shape)} (padding={self.padding!r})"
                )
            y = y + x
        return y


class ConvBlock(nn.Module):
    """``conv -> BN -> act``, twin of ``jaxdsc.ConvBlock``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        *,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        activation: str | None = "relu",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.activation = _check_activation("activation", activation)
        self.conv = Conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=False)
        c = self.conv
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.kernel_size, self.stride, self.dilation, self.padding = c.kernel_size, c.stride, c.dilation, c.padding
        self.bn = BatchNorm(self.out_channels, eps=eps, momentum=momentum)
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.activation, self.bn(self.conv(x)))


# Model modules of their own; they import the layers above, so they come last.
# The DeepLabV3+ twin (upstream backbone + our head) lives in its own module.
from torch_bridge.nn_deeplab import DeepLabV3Plus  # noqa: E402, F401
from torch_bridge.nn_dscnet import DSCNet  # noqa: E402, F401
from torch_bridge.nn_tcn import (  # noqa: E402, F401
    TCN,
    CausalConv,
    TemporalBlock,
    WeightNormConv,
    WeightNormDepthwiseConv,
    WeightNormPointwiseConv,
)
from torch_bridge.nn_unet import UNet  # noqa: E402, F401
