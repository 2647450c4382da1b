"""The JAX <-> PyTorch correspondence, as data.

One :class:`ModuleSpec` per module type says how constructor arguments map
(JAX name, PyTorch name, value transform) and how each parameter or buffer
maps (JAX attribute, PyTorch state-dict name, layout). Conversion, checkpoint
files and the CLI all read this table; nothing else knows about layouts.
Composite modules list no tensors: their children carry the same attribute
names in both frameworks, and conversion recurses into them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import nnx

import jaxdsc
from jaxdsc import models
from torch_bridge import nn as tnn
from torch_bridge.errors import UnsupportedModelError

try:  # torch is only needed to name its classes; keep the table importable for docs
    from torch import nn as torch_nn
    from torch.nn.utils import parametrize
except ImportError:  # pragma: no cover - torch is a declared dependency of the bridge
    torch_nn = None  # type: ignore[assignment]


def _same(value: Any) -> Any:
    return value


def _flip_momentum(m: float) -> float:
    # Flax keeps `momentum` of the old statistic, torch weights the new one.
    return round(1.0 - float(m), 12)


def _json_tuple(value: Any) -> Any:
    """Tuples as lists recursively (JSON shape); strings and scalars unchanged."""
    if isinstance(value, (tuple, list)):
        return [_json_tuple(v) for v in value]
    return value


@dataclass(frozen=True)
class Arg:
    """A constructor argument: ``jax`` name <-> ``torch`` name, with value transforms.

    ``torch_get`` reads the value from a torch module when its attribute of
    that name holds something else (``bias`` holds the Parameter).
    """

    jax: str
    torch: str
    to_torch: Callable[[Any], Any] = _json_tuple
    to_jax: Callable[[Any], Any] = _json_tuple
    torch_get: Callable[[Any], Any] | None = None


def _has_bias(module: Any) -> bool:
    return module.bias is not None


USE_BIAS = Arg("use_bias", "bias", torch_get=_has_bias)
SEP_BIAS = Arg("use_bias", "bias", torch_get=lambda m: m.pointwise.bias is not None)
MOMENTUM = Arg("momentum", "momentum", to_torch=_flip_momentum, to_jax=_flip_momentum)
EPSILON = Arg("epsilon", "eps")


@dataclass(frozen=True)
class Layout:
    """How one tensor is laid out in each framework.

    ``to_torch(array, rank)`` and ``to_jax(array)`` convert values;
    ``torch_shape(jax_shape, rank)`` is used to validate files without data.
    """

    name: str
    to_torch: Callable[[np.ndarray, int | None], np.ndarray]
    to_jax: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...], int | None], tuple[int, ...]]


def _conv_perm(ndim: int) -> tuple[int, ...]:
    # JAX (*k, I, O) -> torch (O, I, *k)
    r = ndim - 2
    return (r + 1, r, *range(r))


def _conv_inv(ndim: int) -> tuple[int, ...]:
    # torch (O, I, *k) -> JAX (*k, I, O)
    return (*range(2, ndim), 1, 0)


SAME = Layout("same", lambda a, r: a, lambda a: a, lambda s, r: s)
CONV = Layout(
    "conv",
    lambda a, r: np.ascontiguousarray(np.transpose(a, _conv_perm(a.ndim))),
    lambda a: np.ascontiguousarray(np.transpose(a, _conv_inv(a.ndim))),
    lambda s, r: tuple(s[i] for i in _conv_perm(len(s))),
)
POINTWISE = Layout(
    "pointwise",  # JAX (I, O) <-> torch (O, I, 1, ..., 1)
    lambda a, r: np.ascontiguousarray(a.T).reshape(a.shape[1], a.shape[0], *(1,) * (r or 0)),
    lambda a: np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1]).T),
    lambda s, r: (s[1], s[0], *(1,) * (r or 0)),
)
LINEAR = Layout(
    "linear",  # JAX (I, O) <-> torch (O, I)
    lambda a, r: np.ascontiguousarray(a.T),
    lambda a: np.ascontiguousarray(a.T),
    lambda s, r: (s[1], s[0]),
)
COUNTER = Layout(
    "counter",  # int32 in JAX (default precision), int64 in torch
    lambda a, r: a.astype(np.int64),
    lambda a: a.astype(np.int32),
    lambda s, r: s,
)


@dataclass(frozen=True)
class TensorRule:
    """A parameter or buffer: JAX attribute <-> torch state-dict name, with a layout."""

    jax: str
    torch: str
    layout: Layout = SAME


@dataclass(frozen=True)
class ModuleSpec:
    """Everything conversion needs to know about one module type."""

    name: str
    jax_cls: type
    torch_cls: type
    args: tuple[Arg, ...]
    tensors: tuple[TensorRule, ...] = ()
    rank_attr: str | None = None
    jax_takes_rngs: bool = True
    jax_extra: dict[str, Any] = field(default_factory=dict)

    def torch_config(self, module: Any) -> dict[str, Any]:
        """Constructor kwargs (torch names) read from a module of either framework."""
        if isinstance(module, self.jax_cls):
            return {a.torch: a.to_torch(getattr(module, a.jax)) for a in self.args}
        return {a.torch: _json_tuple(a.torch_get(module) if a.torch_get else getattr(module, a.torch))
                for a in self.args}

    def jax_kwargs(self, torch_config: dict[str, Any]) -> dict[str, Any]:
        # Arguments the config omits keep their defaults, as in the torch twin (the
        # defaults agree, momentum included: Flax 0.9 == torch 0.1).
        return {a.jax: a.to_jax(torch_config[a.torch]) for a in self.args if a.torch in torch_config}

    def rank(self, module: Any) -> int | None:
        return getattr(module, self.rank_attr) if self.rank_attr else None


_IN, _OUT = Arg("in_features", "in_channels"), Arg("out_features", "out_channels")
_K, _S, _D = Arg("kernel_size", "kernel_size"), Arg("strides", "stride"), Arg("kernel_dilation", "dilation")
_PAD = Arg("padding", "padding")
_DM = Arg("depth_multiplier", "depth_multiplier")
_ACT = Arg("activation", "activation")
_CONV_TENSORS = (TensorRule("kernel", "weight", CONV), TensorRule("bias", "bias"))
_PW_TENSORS = (TensorRule("kernel", "weight", POINTWISE), TensorRule("bias", "bias"))


def _weight_norm_tensors(layout: Layout) -> tuple[TensorRule, ...]:
    """torch's ``parametrizations.weight_norm(dim=0)``: ``original0`` is the gain ``g``
    ``(out, 1, ...)``, ``original1`` the direction ``v``; the JAX gain ``(1, ..., out)`` has
    the kernel's rank, so both take the kernel's layout."""
    return (TensorRule("kernel", "parametrizations.weight.original1", layout),
            TensorRule("gain", "parametrizations.weight.original0", layout), TensorRule("bias", "bias"))


_TCN_ARGS = (Arg("kernel_size", "kernel_size"), Arg("separable", "separable"),
             Arg("weight_norm", "weight_norm"))

SPECS: tuple[ModuleSpec, ...] = (
    ModuleSpec("DepthwiseConv", jaxdsc.DepthwiseConv, tnn.DepthwiseConv,
               (_IN, _K, _DM, _S, _PAD, _D, USE_BIAS), _CONV_TENSORS),
    ModuleSpec("PointwiseConv", jaxdsc.PointwiseConv, tnn.PointwiseConv,
               (_IN, _OUT, USE_BIAS, Arg("num_spatial_dims", "num_spatial_dims")), _PW_TENSORS,
               rank_attr="num_spatial_dims"),
    ModuleSpec("Conv", jaxdsc.Conv, tnn.Conv, (_IN, _OUT, _K, _S, _PAD, _D, USE_BIAS), _CONV_TENSORS),
    ModuleSpec("BatchNorm", jaxdsc.BatchNorm, tnn.BatchNorm,
               (Arg("num_features", "num_features"), EPSILON, MOMENTUM),
               (TensorRule("scale", "weight"), TensorRule("bias", "bias"),
                TensorRule("mean", "running_mean"), TensorRule("var", "running_var"),
                TensorRule("num_batches_tracked", "num_batches_tracked", COUNTER))),
    ModuleSpec("Normalize", jaxdsc.Normalize, tnn.Normalize, (Arg("num_features", "num_features"),),
               (TensorRule("mean", "mean"), TensorRule("std", "std")), jax_takes_rngs=False),
    ModuleSpec("Linear", nnx.Linear, torch_nn.Linear,
               (Arg("in_features", "in_features"), Arg("out_features", "out_features"), USE_BIAS),
               (TensorRule("kernel", "weight", LINEAR), TensorRule("bias", "bias"))),
    ModuleSpec("SeparableConv", jaxdsc.SeparableConv, tnn.SeparableConv,
               (_IN, _OUT, _K, _S, _PAD, _D, _DM, SEP_BIAS, Arg("mid_norm", "mid_norm"),
                Arg("mid_activation", "mid_activation"), Arg("merge", "merge"))),
    ModuleSpec("SeparableBlock", jaxdsc.SeparableBlock, tnn.SeparableBlock,
               (_IN, _OUT, _K, _S, _D, _DM, _PAD, _ACT, Arg("residual", "residual"), Arg("se_ratio", "se_ratio"),
                MOMENTUM, EPSILON)),
    ModuleSpec("SqueezeExcite", jaxdsc.SqueezeExcite, tnn.SqueezeExcite,
               (_IN, Arg("rd_features", "rd_channels"), _ACT, Arg("gate", "gate"),
                Arg("num_spatial_dims", "num_spatial_dims"))),
    ModuleSpec("ConvBlock", jaxdsc.ConvBlock, tnn.ConvBlock,
               (_IN, _OUT, _K, _S, _D, _PAD, _ACT, MOMENTUM, EPSILON)),
    ModuleSpec("WeightNormDepthwiseConv", models.WeightNormDepthwiseConv, tnn.WeightNormDepthwiseConv,
               (_IN, _K, _DM, _S, _PAD, _D, USE_BIAS), _weight_norm_tensors(CONV)),
    ModuleSpec("WeightNormPointwiseConv", models.WeightNormPointwiseConv, tnn.WeightNormPointwiseConv,
               (_IN, _OUT, USE_BIAS, Arg("num_spatial_dims", "num_spatial_dims")),
               _weight_norm_tensors(POINTWISE), rank_attr="num_spatial_dims"),
    ModuleSpec("WeightNormConv", models.WeightNormConv, tnn.WeightNormConv,
               (_IN, _OUT, _K, _S, _PAD, _D, USE_BIAS), _weight_norm_tensors(CONV)),
    ModuleSpec("CausalConv", models.CausalConv, tnn.CausalConv, (_IN, _OUT, *_TCN_ARGS, _D)),
    ModuleSpec("TemporalBlock", models.TemporalBlock, tnn.TemporalBlock,
               (_IN, _OUT, *_TCN_ARGS, _D, Arg("dense_conv1", "dense_conv1"), Arg("gated", "gated"),
                Arg("dropout", "dropout"))),
    ModuleSpec("TCN", models.TCN, tnn.TCN,
               (_IN, _OUT, Arg("channels", "channels"), *_TCN_ARGS, Arg("dense_stem", "dense_stem"),
                Arg("gated", "gated"), Arg("dropout", "dropout"))),
    ModuleSpec("DSCNet", models.DSCNet, tnn.DSCNet,
               (Arg("num_classes", "num_classes"), Arg("in_features", "in_channels"),
                Arg("width", "width"), Arg("depth", "depth"), Arg("widths", "widths"), Arg("strides", "strides"),
                Arg("dilations", "dilations"), Arg("kernel_size", "kernel_size"), Arg("stem_width", "stem_width"),
                _ACT, Arg("se_ratio", "se_ratio"), MOMENTUM, EPSILON)),
    ModuleSpec("UNet", models.UNet, tnn.UNet,
               (Arg("num_classes", "num_classes"), Arg("in_features", "in_channels"),
                Arg("width", "width"), Arg("depth", "depth"), Arg("dilations", "dilations"),
                Arg("separable", "separable"), _ACT, MOMENTUM, EPSILON)),
)

_BY_NAME = {s.name: s for s in SPECS}
_BY_JAX = {s.jax_cls: s for s in SPECS}
_BY_TORCH = {s.torch_cls: s for s in SPECS}


def spec_for_name(name: str) -> ModuleSpec:
    if name not in _BY_NAME:
        raise ValueError(f"unknown module class {name!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def spec_or_none(module: Any) -> ModuleSpec | None:
    """The spec of a module instance (exact type match), or None."""
    return _BY_JAX.get(type(module)) or _BY_TORCH.get(type(module))


def spec_for(module: Any) -> ModuleSpec:
    """The spec of a JAX or torch module instance (exact type match: subclasses may add state)."""
    cls = type(module)
    if torch_nn is not None and parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # torch swaps in a generated subclass for parametrised modules
    spec = _BY_JAX.get(cls) or _BY_TORCH.get(cls)
    if spec is None:
        raise UnsupportedModelError(
            f"no JAX<->PyTorch conversion rule for {type(module).__module__}.{type(module).__name__}; "
            f"supported: {sorted(_BY_NAME)}"
        )
    return spec


JAX_CONTAINERS: tuple[type, ...] = (nnx.List, nnx.Dict)
"""Transparent containers: their items appear under ``name.index`` as in ``nn.ModuleList``."""


def is_jax(module: Any) -> bool:
    return isinstance(module, nnx.Module)
