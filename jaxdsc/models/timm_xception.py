"""timm's aligned Xception (``xception41/65/71`` and the pre-activation ``xception41p/65p``).

The DeepLab variant of Xception (Chen et al. 2018): every max-pool replaced by a
strided depthwise-separable conv, BatchNorm + ReLU after each depthwise and
pointwise conv of the last block. Built from jaxdsc layers (NHWC); attribute
names mirror timm's ``XceptionAligned`` state-dict names, so the bridge's
generic walker produces timm's keys. ``output_stride`` 16 or 8 turns the last
stride-2 blocks into stride 1 and dilates every later block, exactly where timm
does (:func:`block_plan`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv
from jaxdsc.models._common import StochasticDepth
from jaxdsc.models._registry import register_model
from jaxdsc.norm import BatchNorm

__all__ = ["ARCHS", "BlockCfg", "XceptionAligned", "block_plan"]

_PAD = "SYMMETRIC"  # timm's padding='': ((s - 1) + d * (k - 1)) // 2 on both sides


def _arch(entry: list[tuple[int, int, int]], middle: int, preact: bool, eps: float) -> dict[str, Any]:
    exit_flow = [(728, (728, 1024, 1024), 2), (1024, (1536, 1536, 2048), 1)]
    return dict(blocks=[*entry, *[(728, 728, 1)] * middle, *exit_flow], preact=preact, eps=eps)


_ENTRY = [(64, 128, 2), (128, 256, 2), (256, 728, 2)]
_ENTRY71 = [(64, 128, 2), (128, 256, 1), (256, 256, 2), (256, 728, 1), (728, 728, 2)]
ARCHS: dict[str, dict[str, Any]] = {
    "xception41": _arch(_ENTRY, 8, False, 1e-3),
    "xception65": _arch(_ENTRY, 16, False, 1e-3),
    "xception71": _arch(_ENTRY71, 16, False, 1e-3),
    "xception41p": _arch(_ENTRY, 8, True, 1e-5),  # timm gives 41p torch's default BatchNorm2d
    "xception65p": _arch(_ENTRY, 16, True, 1e-3),
}
"""timm's ``block_cfg`` per architecture: (in, out, stride) blocks, pre-activation, BN eps."""


class BlockCfg(NamedTuple):
    in_chs: int
    out_chs: tuple[int, int, int]
    stride: int
    dilation: int
    no_skip: bool
    start_with_relu: bool
    tap: bool  # a feature map is taken inside this block (input of its last separable conv)
    reduction: int  # stride of that tap (or of the block output for the last block)


def block_plan(arch: str, output_stride: int = 32) -> list[BlockCfg]:
    """The blocks of ``arch`` at ``output_stride``, with timm's dilation rule.

    A stride-2 block whose output would exceed ``output_stride`` keeps stride 1
    at its own dilation and multiplies the dilation of every later block by 2.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    cfg = ARCHS[arch]
    plan, dilation, stride_now = [], 1, 2
    last = len(cfg["blocks"]) - 1
    for i, (cin, cout, stride) in enumerate(cfg["blocks"]):
        outs = tuple(cout) if isinstance(cout, tuple) else (cout,) * 3
        block_dilation, tap, reduction = dilation, stride > 1, stride_now
        if stride > 1:
            if stride_now * stride > output_stride:
                dilation *= stride
                stride = 1
            else:
                stride_now *= stride
        if i == last:
            reduction = stride_now
        is_last = i == last
        plan.append(BlockCfg(cin, outs, stride, block_dilation, no_skip=is_last,
                             start_with_relu=cfg["preact"] or not is_last, tap=tap,
                             reduction=reduction))
    return plan


class ConvNormAct(nnx.Module):
    """timm ``ConvNormAct``: ``conv`` (no bias) -> ``bn`` -> optional ReLU."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, act: bool = True,
                 eps: float, common: dict[str, Any], rngs: nnx.Rngs):
        self.conv = Conv(cin, cout, k, strides=stride, padding=_PAD, use_bias=False,
                         dtype=common["dtype"], param_dtype=common["param_dtype"], rngs=rngs)
        self.bn = _bn(cout, eps, common)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x), activation="relu" if self.act else None)


def _bn(c: int, eps: float, common: dict[str, Any]) -> BatchNorm:
    # timm momentum 0.1 == Flax 0.9
    return BatchNorm(c, momentum=0.9, epsilon=eps, dtype=common["dtype"],
                     param_dtype=common["param_dtype"])


def _dw(c: int, stride: int, dilation: int, common: dict[str, Any], rngs: nnx.Rngs) -> DepthwiseConv:
    return DepthwiseConv(c, 3, strides=stride, kernel_dilation=dilation, padding=_PAD,
                         use_bias=False, rngs=rngs, **common)


def _pw(cin: int, cout: int, common: dict[str, Any], rngs: nnx.Rngs) -> PointwiseConv:
    return PointwiseConv(cin, cout, use_bias=False, dtype=common["dtype"],
                         param_dtype=common["param_dtype"], rngs=rngs)


class SeparableConv2d(nnx.Module):
    """timm ``SeparableConv2d``: ``conv_dw`` -> ``bn_dw`` [-> ReLU] -> ``conv_pw`` -> ``bn_pw`` [-> ReLU]."""

    def __init__(self, cin: int, cout: int, *, stride: int, dilation: int, act: bool, eps: float,
                 common: dict[str, Any], rngs: nnx.Rngs):
        self.conv_dw = _dw(cin, stride, dilation, common, rngs)
        self.bn_dw = _bn(cin, eps, common)
        self.conv_pw = _pw(cin, cout, common, rngs)
        self.bn_pw = _bn(cout, eps, common)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        a = "relu" if self.act else None
        x = self.bn_dw(self.conv_dw(x), activation=a)
        return self.bn_pw(self.conv_pw(x), activation=a)


class PreSeparableConv2d(nnx.Module):
    """timm ``PreSeparableConv2d``: [``norm`` BN + ReLU] -> ``conv_dw`` -> ``conv_pw``."""

    def __init__(self, cin: int, cout: int, *, stride: int, dilation: int, first_act: bool,
                 eps: float, common: dict[str, Any], rngs: nnx.Rngs):
        self.norm = _bn(cin, eps, common) if first_act else None
        self.conv_dw = _dw(cin, stride, dilation, common, rngs)
        self.conv_pw = _pw(cin, cout, common, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm is not None:
            x = self.norm(x, activation="relu")
        return self.conv_pw(self.conv_dw(x))


class Stack(nnx.Module):
    """timm's ``stack`` Sequential: ``conv1..conv3`` (the ``act*`` ReLUs hold no state)."""

    def __init__(self, convs: list[nnx.Module], relu_first: bool):
        self.conv1, self.conv2, self.conv3 = convs
        self.relu_first = relu_first

    def layers(self) -> tuple[nnx.Module, nnx.Module, nnx.Module]:
        return self.conv1, self.conv2, self.conv3

    def forward_with_tap(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Stack output and the input of ``conv3`` (after ``act3``: timm's feature tap)."""
        act = jax.nn.relu if self.relu_first else (lambda v: v)
        tap = act(self.conv2(act(self.conv1(act(x)))))
        return self.conv3(tap), tap


class XceptionModule(nnx.Module):
    """timm ``XceptionModule`` (post-activation) / ``PreXceptionModule`` (``preact``)."""

    def __init__(self, b: BlockCfg, *, preact: bool, eps: float, drop_path: float,
                 common: dict[str, Any], rngs: nnx.Rngs):
        self.preact, self.no_skip = preact, b.no_skip
        needs_proj = not b.no_skip and (b.out_chs[-1] != b.in_chs or b.stride != 1)
        if preact:
            self.norm = _bn(b.in_chs, eps, common)
            self.shortcut = (Conv(b.in_chs, b.out_chs[-1], 1, strides=b.stride, padding=_PAD,
                                  use_bias=False, dtype=common["dtype"],
                                  param_dtype=common["param_dtype"], rngs=rngs)
                             if needs_proj else None)
        else:
            self.shortcut = (ConvNormAct(b.in_chs, b.out_chs[-1], 1, stride=b.stride, act=False,
                                         eps=eps, common=common, rngs=rngs)
                             if needs_proj else None)
        convs, cin = [], b.in_chs
        for i, cout in enumerate(b.out_chs):
            stride = b.stride if i == 2 else 1
            if preact:
                convs.append(PreSeparableConv2d(cin, cout, stride=stride, dilation=b.dilation,
                                                first_act=i > 0, eps=eps, common=common, rngs=rngs))
            else:
                convs.append(SeparableConv2d(cin, cout, stride=stride, dilation=b.dilation,
                                             act=not b.start_with_relu, eps=eps, common=common,
                                             rngs=rngs))
            cin = cout
        self.stack = Stack(convs, relu_first=b.start_with_relu and not preact)
        # timm's DropPath (per sample, survivors scaled by 1 / keep) is torchvision's "row" mode.
        self.drop_path = StochasticDepth(drop_path, "row", rngs=rngs) if drop_path > 0 else None

    def forward_with_tap(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Block output and the input of its last separable conv (timm's feature tap)."""
        if self.preact:
            x = self.norm(x, activation="relu")
        y, tap = self.stack.forward_with_tap(x)
        if not self.no_skip:
            if self.drop_path is not None:
                y = self.drop_path(y)
            y = y + (x if self.shortcut is None else self.shortcut(x))
        return y, tap

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_with_tap(x)[0]


class ClassifierHead(nnx.Module):
    """timm ``ClassifierHead`` (avg pool -> ``drop`` -> ``fc``); ``fc`` is None for ``num_classes=0``."""

    def __init__(self, cin: int, num_classes: int, drop_rate: float, *, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.drop = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
        self.fc = (nnx.Linear(cin, num_classes, param_dtype=param_dtype, rngs=rngs)
                   if num_classes > 0 else None)

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        x = jnp.mean(x.astype(acc), axis=(1, 2)).astype(x.dtype)
        if self.drop is not None:
            x = self.drop(x)
        if pre_logits or self.fc is None:
            return x
        return self.fc(x).astype(x.dtype)


class XceptionAligned(nnx.Module):
    """timm ``XceptionAligned`` in NHWC: images ``(N, H, W, in_chans)`` -> logits ``(N, num_classes)``.

    Args:
      arch: a key of :data:`ARCHS` (``"xception65"``...).
      num_classes: classifier outputs; 0 drops ``head.fc`` (``__call__`` returns pooled features).
      in_chans: image channels.
      output_stride: 8, 16 or 32 (see :func:`block_plan`).
      drop_rate: dropout before the classifier (training only).
      drop_path_rate: stochastic depth, linear in the block index up to this rate.
      dtype, param_dtype, impl: jaxdsc options of the layers.

    Like timm, the model does not normalise its input (timm's config: Inception
    mean/std 0.5).
    """

    def __init__(self, arch: str = "xception65", *, num_classes: int = 1000, in_chans: int = 3,
                 output_stride: int = 32, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
        plan = block_plan(arch, output_stride)
        if global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg' (the only pooling supported), got {global_pool!r}")
        self.arch, self.preact = arch, ARCHS[arch]["preact"]
        self.num_classes = _checks.positive_int("num_classes", num_classes, minimum=0)
        self.in_chans = _checks.positive_int("in_chans", in_chans)
        self.output_stride = output_stride
        self.model_name = f"timm:{arch}"
        self.drop_rate = _checks.number("drop_rate", drop_rate, low=0.0, high=1.0)
        self.drop_path_rate = _checks.number("drop_path_rate", drop_path_rate, low=0.0, high=1.0)
        eps = ARCHS[arch]["eps"]
        common = dict(dtype=dtype, param_dtype=param_dtype, impl=impl)
        cc = dict(dtype=dtype, param_dtype=param_dtype)
        first = ConvNormAct(in_chans, 32, 3, stride=2, eps=eps, common=cc, rngs=rngs)
        second = (Conv(32, 64, 3, padding=_PAD, use_bias=False, rngs=rngs, **cc) if self.preact
                  else ConvNormAct(32, 64, 3, eps=eps, common=cc, rngs=rngs))
        self.stem = nnx.List([first, second])
        n = len(plan)
        self.blocks = nnx.List([
            XceptionModule(b, preact=self.preact, eps=eps, drop_path=drop_path_rate * i / (n - 1),
                           common=common, rngs=rngs)
            for i, b in enumerate(plan)
        ])
        self.feature_info = [dict(num_chs=b.out_chs[-2] if b.tap else b.out_chs[-1],
                                  reduction=b.reduction)
                             for b in plan if b.tap] + [dict(num_chs=plan[-1].out_chs[-1],
                                                             reduction=plan[-1].reduction)]
        self._taps = tuple(b.tap for b in plan)
        self.num_features = plan[-1].out_chs[-1]
        self.config = dict(num_classes=self.num_classes, in_chans=self.in_chans,
                           output_stride=output_stride, drop_rate=self.drop_rate,
                           drop_path_rate=self.drop_path_rate)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate,
                                   param_dtype=param_dtype, rngs=rngs)

    def _stem(self, x: jax.Array) -> jax.Array:
        for layer in self.stem:
            x = layer(x)
        return x

    def features(self, x: jax.Array) -> list[jax.Array]:
        """timm's ``forward_intermediates(x, intermediates_only=True)`` in NHWC.

        One map per stride-2 block of the architecture (the input of its last
        separable conv; reductions 2, 4, 8, 16 for xception41/65, channels in
        ``feature_info``) plus the last block's output (before the pre-activation
        models' final ReLU).
        """
        x, out = self._stem(x), []
        for blk, tap in zip(self.blocks, self._taps, strict=True):
            x, t = blk.forward_with_tap(x)
            if tap:
                out.append(t)
        out.append(x)
        return out

    def forward_features(self, x: jax.Array) -> jax.Array:
        x = self._stem(x)
        for blk in self.blocks:
            x = blk(x)
        return jax.nn.relu(x) if self.preact else x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.forward_features(x))



def _builder(arch: str):
    def build(*, rngs: nnx.Rngs, num_classes: int = 1000, in_chans: int = 3, output_stride: int = 32,
              drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
              dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
              impl: str = "auto") -> XceptionAligned:
        return XceptionAligned(arch, num_classes=num_classes, in_chans=in_chans,
                               output_stride=output_stride, drop_rate=drop_rate,
                               drop_path_rate=drop_path_rate, global_pool=global_pool, dtype=dtype,
                               param_dtype=param_dtype, impl=impl, rngs=rngs)

    build.__name__ = arch
    build.__doc__ = f"``timm.create_model('{arch}', **kwargs)`` in JAX (:class:`XceptionAligned`)."
    return register_model(f"timm:{arch}")(build)


for _name in ARCHS:
    _builder(_name)
