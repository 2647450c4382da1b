"""timm's MobileNetV2 / MobileNetV3 / EfficientNet families in JAX (Flax NNX, NHWC).

One table of architectures (:data:`ARCHS`: timm's arch strings plus the
scaling arguments of its ``_gen_*`` functions) and one builder:
:func:`decode_arch` turns the strings into resolved :class:`BlockCfg` stages
exactly as timm 1.0's ``decode_arch_def`` / ``EfficientNetBuilder`` do
(channel rounding, depth scaling, squeeze-excitation widths, stochastic
depth rates, ``output_stride`` turned into dilation), and
:class:`TimmEfficientNet` / :class:`TimmMobileNetV3` build the modules from
that plan. The module tree mirrors timm's state-dict names (``conv_stem``,
``bn1``, ``blocks.i.j.conv_dw`` ..., ``conv_head``, ``bn2``, ``classifier``).

``tf_*`` models use TensorFlow "SAME" padding (jaxdsc ``"SAME"``, which equals
timm's ``Conv2dSame`` / ``pad_type="same"``) and BatchNorm eps 1e-3; the
others PyTorch-style symmetric padding (jaxdsc ``"SYMMETRIC"``).

Registered as ``timm:<name>`` (``jaxdsc.models.list_models("timm:*")``); the
builders take timm's keyword arguments ``num_classes``, ``in_chans``,
``drop_rate``, ``drop_path_rate`` and, for the EfficientNet class (MobileNetV2,
EfficientNet), ``output_stride`` (timm's MobileNetV3 class has none).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxdsc import _checks
from jaxdsc._types import Dtype
from jaxdsc.conv import Conv
from jaxdsc.models._common import global_avg_pool, make_divisible
from jaxdsc.models._registry import register_model
from jaxdsc.models._timm_blocks import BLOCKS, BlockCfg, act, conv_init, linear_init, pointwise
from jaxdsc.models._timm_blocks import _bn as batch_norm

__all__ = ["ARCHS", "Arch", "Plan", "TimmEfficientNet", "TimmMobileNetV3", "decode_arch", "round_channels"]


# ---------------------------------------------------------------- channel / depth rounding (timm's rules)
def round_channels(chs: int, multiplier: float = 1.0, divisor: int = 8) -> int:
    """timm's ``round_channels``: ``make_divisible(chs * multiplier, 8)``."""
    return make_divisible(chs * multiplier, divisor) if multiplier else chs


def _scale_depth(repeats: list[int], multiplier: float) -> list[int]:
    """timm's ``_scale_stage_depth`` ('ceil'): scale a stage's total, hand it out from the last entry."""
    num, scaled = sum(repeats), math.ceil(sum(repeats) * multiplier)
    out = []
    for r in repeats[::-1]:
        rs = max(1, round(r / num * scaled))
        out.append(rs)
        num, scaled = num - r, scaled - rs
    return out[::-1]


# ---------------------------------------------------------------- architecture table
@dataclass(frozen=True)
class Arch:
    """A timm architecture: its class, block strings and the arguments its ``_gen_*`` passes."""

    cls: str                          # "efficientnet" (timm EfficientNet) or "mobilenetv3" (timm MobileNetV3)
    blocks: tuple[tuple[str, ...], ...]
    act: str
    channel_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    fix_first_last: bool = False      # depth scaling leaves the first and last stage alone
    stem_size: int = 32
    fix_stem: bool = False
    num_features: int = 1280
    tf: bool = False                  # TF "SAME" padding and BatchNorm eps 1e-3
    se_from_exp: bool = False         # SE width from the expanded channels (MobileNetV3)
    se_gate: str = "sigmoid"
    se_act: str | None = None         # None: the block's activation
    se_round: str = "round"           # "round" (EfficientNet) or "divisible" (MobileNetV3)
    head_bias: bool = True            # MobileNetV3 conv_head bias

    @property
    def padding(self) -> str:
        return "SAME" if self.tf else "SYMMETRIC"

    @property
    def eps(self) -> float:
        return 1e-3 if self.tf else 1e-5


_MBV2 = (("ds_r1_k3_s1_c16",), ("ir_r2_k3_s2_e6_c24",), ("ir_r3_k3_s2_e6_c32",), ("ir_r4_k3_s2_e6_c64",),
         ("ir_r3_k3_s1_e6_c96",), ("ir_r3_k3_s2_e6_c160",), ("ir_r1_k3_s1_e6_c320",))
_EFFNET = (("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r2_k3_s2_e6_c24_se0.25",), ("ir_r2_k5_s2_e6_c40_se0.25",),
           ("ir_r3_k3_s2_e6_c80_se0.25",), ("ir_r3_k5_s1_e6_c112_se0.25",), ("ir_r4_k5_s2_e6_c192_se0.25",),
           ("ir_r1_k3_s1_e6_c320_se0.25",))
_MBV3_LARGE = (("ds_r1_k3_s1_e1_c16_nre",), ("ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"),
               ("ir_r3_k5_s2_e3_c40_se0.25_nre",),
               ("ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"),
               ("ir_r2_k3_s1_e6_c112_se0.25",), ("ir_r3_k5_s2_e6_c160_se0.25",), ("cn_r1_k1_s1_c960",))
_MBV3_LARGE_MIN = (("ds_r1_k3_s1_e1_c16",), ("ir_r1_k3_s2_e4_c24", "ir_r1_k3_s1_e3_c24"), ("ir_r3_k3_s2_e3_c40",),
                   ("ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"),
                   ("ir_r2_k3_s1_e6_c112",), ("ir_r3_k3_s2_e6_c160",), ("cn_r1_k1_s1_c960",))
_MBV3_SMALL = (("ds_r1_k3_s2_e1_c16_se0.25_nre",), ("ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"),
               ("ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"), ("ir_r2_k5_s1_e3_c48_se0.25",),
               ("ir_r3_k5_s2_e6_c96_se0.25",), ("cn_r1_k1_s1_c576",))
_MBV3_SMALL_MIN = (("ds_r1_k3_s2_e1_c16",), ("ir_r1_k3_s2_e4.5_c24", "ir_r1_k3_s1_e3.67_c24"),
                   ("ir_r1_k3_s2_e4_c40", "ir_r2_k3_s1_e6_c40"), ("ir_r2_k3_s1_e3_c48",), ("ir_r3_k3_s2_e6_c96",),
                   ("cn_r1_k1_s1_c576",))


def _mobilenet_v2(cm: float, dm: float = 1.0, fix_stem_head: bool = False) -> Arch:
    nf = 1280 if fix_stem_head else max(1280, round_channels(1280, cm))
    return Arch("efficientnet", _MBV2, "relu6", cm, dm, fix_first_last=fix_stem_head, fix_stem=fix_stem_head,
                num_features=nf)


def _efficientnet(cm: float, dm: float, tf: bool = False) -> Arch:
    return Arch("efficientnet", _EFFNET, "silu", cm, dm, num_features=round_channels(1280, cm), tf=tf)


def _mobilenet_v3(size: str, cm: float, dm: float = 1.0, minimal: bool = False, tf: bool = False) -> Arch:
    blocks = {("large", False): _MBV3_LARGE, ("large", True): _MBV3_LARGE_MIN,
              ("small", False): _MBV3_SMALL, ("small", True): _MBV3_SMALL_MIN}[size, minimal]
    return Arch("mobilenetv3", blocks, "relu" if minimal else "hard_swish", cm, dm, stem_size=16,
                fix_stem=cm < 0.75, num_features=1024 if size == "small" else 1280, tf=tf, se_from_exp=True,
                se_gate="hard_sigmoid", se_act="relu", se_round="divisible")


_EFFNET_SCALES = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8), 5: (1.6, 2.2),
                  6: (1.8, 2.6), 7: (2.0, 3.1)}

ARCHS: dict[str, Arch] = {
    **{f"mobilenetv2_{n:03d}": _mobilenet_v2(n / 100) for n in (35, 50, 75, 100, 140)},
    "mobilenetv2_110d": _mobilenet_v2(1.1, 1.2, fix_stem_head=True),
    "mobilenetv2_120d": _mobilenet_v2(1.2, 1.4, fix_stem_head=True),
    **{f"efficientnet_b{i}": _efficientnet(*s) for i, s in _EFFNET_SCALES.items()},
    **{f"tf_efficientnet_b{i}": _efficientnet(*s, tf=True) for i, s in _EFFNET_SCALES.items()},
    "mobilenetv3_large_075": _mobilenet_v3("large", 0.75),
    "mobilenetv3_large_100": _mobilenet_v3("large", 1.0),
    "mobilenetv3_large_150d": _mobilenet_v3("large", 1.5, 1.2),
    **{f"mobilenetv3_small_{n:03d}": _mobilenet_v3("small", n / 100) for n in (50, 75, 100)},
    **{f"tf_mobilenetv3_{s}_{n:03d}": _mobilenet_v3(s, n / 100, tf=True)
       for s in ("large", "small") for n in (75, 100)},
    "tf_mobilenetv3_large_minimal_100": _mobilenet_v3("large", 1.0, minimal=True, tf=True),
    "tf_mobilenetv3_small_minimal_100": _mobilenet_v3("small", 1.0, minimal=True, tf=True),
}
"""timm name -> architecture (``timm.create_model(name)`` builds the same network)."""


# ---------------------------------------------------------------- decoding
_ACT_CODES = {"re": "relu", "r6": "relu6", "hs": "hard_swish", "sw": "silu"}


def _decode_block(s: str) -> tuple[dict, int]:
    """One timm block string (``ir_r2_k3_s2_e6_c24_se0.25_nre``) -> (options, repeats)."""
    kind, *ops = s.split("_")
    if kind not in ("ds", "ir", "cn"):
        raise ValueError(f"block type {kind!r} in {s!r} is not supported; expected 'ds', 'ir' or 'cn'")
    opts: dict = {"kind": kind, "act": None, "noskip": False, "e": 1.0, "se": 0.0}
    for op in ops:
        if op == "noskip":
            opts["noskip"] = True
        elif op.startswith("n") and op[1:] in _ACT_CODES:
            opts["act"] = _ACT_CODES[op[1:]]
        else:
            key, value = re.split(r"(\d.*)", op)[:2]
            if key not in ("r", "k", "s", "e", "c", "se"):
                raise ValueError(f"option {op!r} in block string {s!r} is not supported")
            opts[key] = float(value) if key in ("e", "se") else int(value)
    return opts, opts.pop("r")


@dataclass(frozen=True)
class Plan:
    """The resolved network: stem width, block stages, feature taps and head input width."""

    stem_size: int
    stages: tuple[tuple[BlockCfg, ...], ...]
    taps: tuple[int, ...]        # -1: the stem (bn1) output, i: the output of stage i
    reductions: tuple[int, ...]  # the stride of each tap

    @property
    def head_in(self) -> int:
        return self.stages[-1][-1].out_chs


def decode_arch(arch: Arch, *, output_stride: int = 32, drop_path_rate: float = 0.0) -> Plan:
    """The blocks timm's ``decode_arch_def`` + ``EfficientNetBuilder`` build for ``arch``."""
    rc = partial(round_channels, multiplier=arch.channel_multiplier)
    stem = arch.stem_size if arch.fix_stem else rc(arch.stem_size)
    stages = []
    for i, strings in enumerate(arch.blocks):
        decoded = [_decode_block(s) for s in strings]
        fixed = arch.fix_first_last and i in (0, len(arch.blocks) - 1)
        reps = _scale_depth([r for _, r in decoded], 1.0 if fixed else arch.depth_multiplier)
        stages.append([o for (o, _), r in zip(decoded, reps, strict=True) for _ in range(r)])
    total = sum(len(s) for s in stages)
    taps, reductions = ([-1], [2]) if stages[0][0]["s"] > 1 else ([], [])
    cfgs, in_chs, idx, stride, dilation = [], stem, 0, 2, 1
    for si, stage in enumerate(stages):
        blocks = []
        for bi, o in enumerate(stage):
            s = o["s"] if bi == 0 else 1
            next_dilation = dilation
            if s > 1:
                if stride * s > output_stride:  # timm keeps the resolution and dilates from the next block on
                    next_dilation, s = dilation * s, 1
                else:
                    stride *= s
            block_act = o["act"] or arch.act
            out = rc(o["c"])
            mid = make_divisible(in_chs * o["e"], 8) if o["kind"] == "ir" else in_chs
            se_chs = 0
            if o["se"]:
                ratio = o["se"] if arch.se_from_exp else o["se"] / (o["e"] if o["kind"] == "ir" else 1.0)
                se_chs = make_divisible(mid * ratio, 8) if arch.se_round == "divisible" else round(mid * ratio)
            blocks.append(BlockCfg(
                kind=o["kind"], in_chs=in_chs, out_chs=out, kernel=o["k"], stride=s, dilation=dilation,
                act=block_act, mid_chs=mid, se_chs=se_chs, se_act=arch.se_act or block_act, se_gate=arch.se_gate,
                noskip=o["noskip"], drop_path=drop_path_rate * idx / total,
            ))
            dilation, in_chs, idx = next_dilation, out, idx + 1
        if si + 1 == len(stages) or stages[si + 1][0]["s"] > 1:
            taps.append(si)
            reductions.append(stride)
        cfgs.append(tuple(blocks))
    return Plan(stem, tuple(cfgs), tuple(taps), tuple(reductions))


# ---------------------------------------------------------------- models
class _TimmNet(nnx.Module):
    """Stem, block stages and ``features``, shared by both timm classes."""

    timm_class = ""

    def __init__(self, arch: str, *, num_classes: int, in_chans: int, drop_rate: float, drop_path_rate: float,
                 output_stride: int, dtype: Dtype | None, param_dtype: Dtype, precision: lax.PrecisionLike,
                 impl: str, rngs: nnx.Rngs):
        if arch not in ARCHS or ARCHS[arch].cls != self.timm_class:
            names = sorted(n for n, a in ARCHS.items() if a.cls == self.timm_class)
            raise ValueError(f"arch must be one of {names}, got {arch!r}")
        spec = ARCHS[arch]
        self.arch, self.spec = arch, spec
        self.num_classes = _checks.positive_int("num_classes", num_classes, minimum=0)
        self.in_chans = _checks.positive_int("in_chans", in_chans)
        self.drop_rate = _checks.number("drop_rate", drop_rate, low=0.0, high=1.0)
        self.drop_path_rate = _checks.number("drop_path_rate", drop_path_rate, low=0.0, high=1.0)
        if output_stride not in (2, 4, 8, 16, 32):
            raise ValueError(f"output_stride must be one of 2, 4, 8, 16, 32, got {output_stride!r}")
        self.plan = plan = decode_arch(spec, output_stride=output_stride, drop_path_rate=self.drop_path_rate)
        self.model_name = f"timm:{arch}"
        self.config = {"num_classes": self.num_classes, "in_chans": self.in_chans, "drop_rate": self.drop_rate,
                       "drop_path_rate": self.drop_path_rate}
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.conv_stem = Conv(in_chans, plan.stem_size, 3, strides=2, padding=spec.padding, use_bias=False,
                              kernel_init=conv_init, impl=impl, rngs=rngs, **common)
        self.bn1 = batch_norm(plan.stem_size, spec.eps, common)
        self.blocks = nnx.List([
            nnx.List([BLOCKS[c.kind](c, padding=spec.padding, eps=spec.eps, impl=impl, rngs=rngs, **common)
                      for c in stage])
            for stage in plan.stages
        ])
        self._build_head(common, rngs)
        self.drop = nnx.Dropout(self.drop_rate, rngs=rngs)
        self.classifier = None if self.num_classes == 0 else nnx.Linear(  # timm: nn.Identity for 0 classes
            spec.num_features, self.num_classes, kernel_init=linear_init, dtype=dtype,
            param_dtype=param_dtype, precision=precision, rngs=rngs)

    def _build_head(self, common: dict, rngs: nnx.Rngs) -> None:
        raise NotImplementedError

    def _stem(self, x: jax.Array) -> jax.Array:
        return self.bn1(self.conv_stem(x), activation=self.spec.act)

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The last block stage's output ``(N, H/32, W/32, C)`` (timm's ``forward_features`` before the head)."""
        x = self._stem(x)
        for stage in self.blocks:
            for block in stage:
                x = block(x)
        return x

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The multi-scale maps timm's ``features_only=True`` model returns (``out_indices=(0,1,2,3,4)``).

        NHWC, strides 2, 4, 8, 16, 32 (less where ``output_stride`` dilates).
        """
        x = self._stem(x)
        out = [x] if self.plan.taps[0] == -1 else []
        for i, stage in enumerate(self.blocks):
            for block in stage:
                x = block(x)
            if i in self.plan.taps:
                out.append(x)
        return out

    def _classify(self, x: jax.Array) -> jax.Array:
        x = self.drop(x) if self.drop_rate > 0 else x
        return x if self.classifier is None else self.classifier(x)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        chs = [self.plan.stem_size] if self.plan.taps[0] == -1 else []
        return tuple(chs + [self.plan.stages[i][-1].out_chs for i in self.plan.taps if i >= 0])


class TimmEfficientNet(_TimmNet):
    """timm's ``EfficientNet`` class (MobileNetV2, EfficientNet B0-B7, ``tf_efficientnet_*``).

    ``stem -> blocks -> conv_head -> bn2(act) -> mean -> dropout -> classifier``.
    Input ``(N, H, W, in_chans)``, logits ``(N, num_classes)`` (pooled features
    when ``num_classes=0``). Dropout and stochastic depth act in training
    only and draw from the build-time ``rngs`` (stream ``"dropout"``).
    """

    timm_class = "efficientnet"

    def __init__(self, arch: str, *, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, output_stride: int = 32, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, precision: lax.PrecisionLike = None, impl: str = "auto",
                 rngs: nnx.Rngs):
        super().__init__(arch, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, output_stride=output_stride, dtype=dtype,
                         param_dtype=param_dtype, precision=precision, impl=impl, rngs=rngs)
        self.output_stride = output_stride
        self.config["output_stride"] = output_stride

    def _build_head(self, common: dict, rngs: nnx.Rngs) -> None:
        nf = self.spec.num_features
        self.conv_head = pointwise(self.plan.head_in, nf, False, rngs, common)
        self.bn2 = batch_norm(nf, self.spec.eps, common)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn2(self.conv_head(self.forward_features(x)), activation=self.spec.act)
        return self._classify(global_avg_pool(x))


class TimmMobileNetV3(_TimmNet):
    """timm's ``MobileNetV3`` class (``mobilenetv3_*``, ``tf_mobilenetv3_*``): the "efficient head".

    ``stem -> blocks -> mean -> conv_head(+bias) -> act -> dropout -> classifier``.
    """

    timm_class = "mobilenetv3"

    def __init__(self, arch: str, *, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 precision: lax.PrecisionLike = None, impl: str = "auto", rngs: nnx.Rngs):
        super().__init__(arch, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, output_stride=32, dtype=dtype, param_dtype=param_dtype,
                         precision=precision, impl=impl, rngs=rngs)

    def _build_head(self, common: dict, rngs: nnx.Rngs) -> None:
        self.conv_head = pointwise(self.plan.head_in, self.spec.num_features, self.spec.head_bias, rngs, common)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = global_avg_pool(self.forward_features(x), keepdims=True)
        x = act(self.spec.act, self.conv_head(x))
        return self._classify(x.reshape(x.shape[0], -1))


def _register(name: str, cls: type) -> None:
    def build(*, rngs: nnx.Rngs, **kwargs) -> _TimmNet:
        return cls(name, rngs=rngs, **kwargs)

    build.__name__ = name
    # The class's keyword arguments (the bridge passes param_dtype / impl only when listed).
    sig = inspect.signature(cls.__init__)
    build.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items()
                                                  if n not in ("self", "arch")])
    build.__doc__ = f"timm's ``{name}`` (:class:`{cls.__name__}`) with timm's keyword arguments."
    register_model(f"timm:{name}")(build)


for _name, _arch in ARCHS.items():
    _register(_name, TimmEfficientNet if _arch.cls == "efficientnet" else TimmMobileNetV3)
