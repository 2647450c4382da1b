"""The blocks of timm's EfficientNet / MobileNet builder (``timm/models/_efficientnet_blocks.py``).

Each block's attribute names are timm's submodule names (``conv_pw``, ``bn1``,
``conv_dw``, ``se.conv_reduce`` ...), so the generic walker of
``torch_bridge`` maps them onto timm's state-dict keys. Blocks are built from
a :class:`BlockCfg` (the decoded, fully resolved arguments of one timm block)
so the plan and the modules stay separate: the plan is plain data that can be
checked against a timm instance without building anything.

Stochastic depth (timm's ``DropPath``: per sample, survivors scaled by
``1 / (1 - p)``) is :class:`jaxdsc.models._common.StochasticDepth` in ``"row"``
mode, active only in training, drawing from a fork of the build-time ``rngs``
stream ``"dropout"``; blocks with rate 0 get the identity, as timm's
``nn.Identity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdsc.activations import ACTIVATIONS
from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv
from jaxdsc.models._common import Identity, StochasticDepth, global_avg_pool
from jaxdsc.norm import BatchNorm


# ---------------------------------------------------------------- initialisers (timm's _init_weight_goog)
def _draw(key: jax.Array, shape: tuple[int, ...], dtype, scale: float, uniform: bool) -> jax.Array:
    """``scale * N(0, 1)`` (or ``U(-scale, scale)``) of ``shape`` from ``key``.

    Eager ``jax.random`` compiles once per shape, which made building a model
    take a minute on a busy 2-core CPU (about 80 distinct shapes); drawing from
    a few power-of-two buckets and cutting on the host needs one compile per
    bucket. Under tracing (``nnx.eval_shape``, ``jit``) the plain call is used.
    """
    n = math.prod(shape)
    if isinstance(key, jax.core.Tracer) or n == 0:
        if uniform:
            return jax.random.uniform(key, shape, dtype, -scale, scale)
        return jax.random.normal(key, shape, dtype) * jnp.asarray(scale, dtype)
    bucket = max(1024, 1 << (n - 1).bit_length())
    if uniform:
        flat = np.asarray(jax.random.uniform(key, (bucket,), jnp.float32, -1.0, 1.0))
    else:
        flat = np.asarray(jax.random.normal(key, (bucket,), jnp.float32))
    return jnp.asarray((flat[:n] * np.float32(scale)).reshape(shape), dtype=dtype)


def conv_init(key, shape, dtype=jnp.float32):
    """normal(0, sqrt(2 / fan_out)) for JAX conv kernels ``(*k, I, O)``, fan_out = k*k*O."""
    return _draw(key, shape, dtype, math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1])), False)


def depthwise_init(key, shape, dtype=jnp.float32):
    """As :func:`conv_init` for depthwise kernels ``(*k, 1, C)``: fan_out = k*k (one group each)."""
    return _draw(key, shape, dtype, math.sqrt(2.0 / math.prod(shape[:-2])), False)


def pointwise_init(key, shape, dtype=jnp.float32):
    """As :func:`conv_init` for 1x1 kernels ``(I, O)``: fan_out = O."""
    return _draw(key, shape, dtype, math.sqrt(2.0 / shape[-1]), False)


def linear_init(key, shape, dtype=jnp.float32):
    """timm's classifier init: uniform(-r, r), r = 1 / sqrt(out_features)."""
    return _draw(key, shape, dtype, 1.0 / math.sqrt(shape[-1]), True)


def act(name: str | None, x: jax.Array) -> jax.Array:
    """timm's activations by the names its arch strings decode to (jaxdsc's table: hard_sigmoid included)."""
    return x if name is None else ACTIVATIONS[name](x)


@dataclass(frozen=True)
class BlockCfg:
    """One resolved timm block: ``kind`` is ``"ds"``, ``"ir"`` or ``"cn"`` (timm's block types).

    ``se_chs`` is the squeeze-excitation width (0: no SE); ``mid_chs`` the
    expanded width of an inverted residual (else ``in_chs``).
    """

    kind: str
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    dilation: int
    act: str
    mid_chs: int
    se_chs: int = 0
    se_act: str = "relu"
    se_gate: str = "sigmoid"
    noskip: bool = False
    pw_act: bool = False
    drop_path: float = 0.0

    @property
    def has_skip(self) -> bool:
        if self.kind == "cn":  # timm's ConvBnAct has a skip only when asked ("skip"); no arch here does
            return False
        return self.stride == 1 and self.in_chs == self.out_chs and not self.noskip


class SqueezeExcite(nnx.Module):
    """timm's EfficientNet ``SqueezeExcite``: ``x * gate(expand(act(reduce(mean_hw(x)))))``."""

    def __init__(self, chs: int, rd_chs: int, act_name: str, gate: str, *, rngs: nnx.Rngs, **common):
        self.conv_reduce = pointwise(chs, rd_chs, True, rngs, common)
        self.conv_expand = pointwise(rd_chs, chs, True, rngs, common)
        self.act_name, self.gate = act_name, gate

    def __call__(self, x: jax.Array) -> jax.Array:
        s = global_avg_pool(x, keepdims=True)
        s = self.conv_expand(act(self.act_name, self.conv_reduce(s)))
        return x * act(self.gate, s).astype(x.dtype)


def pointwise(n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs, common: dict) -> PointwiseConv:
    return PointwiseConv(n_in, n_out, use_bias=bias, kernel_init=pointwise_init, rngs=rngs, **common)


def _bn(chs: int, eps: float, common: dict) -> BatchNorm:
    # torch momentum 0.1 (timm's default, also for tf_ models) == Flax momentum 0.9
    return BatchNorm(chs, momentum=0.9, epsilon=eps, dtype=common.get("dtype"),
                     param_dtype=common.get("param_dtype", jnp.float32))


def _dw(cfg: BlockCfg, chs: int, padding: str, impl: str, common: dict, rngs: nnx.Rngs) -> DepthwiseConv:
    return DepthwiseConv(chs, cfg.kernel, strides=cfg.stride, kernel_dilation=cfg.dilation,
                         padding=padding, use_bias=False, kernel_init=depthwise_init, impl=impl, rngs=rngs,
                         **common)


def _drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Module:
    return StochasticDepth(rate, "row", rngs=rngs) if rate else Identity()


class _Block(nnx.Module):
    def _finish(self, x: jax.Array, shortcut: jax.Array) -> jax.Array:
        return self.drop_path(x) + shortcut if self.has_skip else x


class DepthwiseSeparableConv(_Block):
    """timm ``ds``/``dsa``: ``conv_dw -> bn1(act) -> se -> conv_pw -> bn2`` (+ shortcut)."""

    def __init__(self, cfg: BlockCfg, *, padding: str, eps: float, impl: str = "auto",
                 rngs: nnx.Rngs, **common):
        self.has_skip, self.act_name, self.pw_act = cfg.has_skip, cfg.act, cfg.pw_act
        self.conv_dw = _dw(cfg, cfg.in_chs, padding, impl, common, rngs)
        self.bn1 = _bn(cfg.in_chs, eps, common)
        self.se = (SqueezeExcite(cfg.in_chs, cfg.se_chs, cfg.se_act, cfg.se_gate, rngs=rngs, **common)
                   if cfg.se_chs else None)
        self.conv_pw = pointwise(cfg.in_chs, cfg.out_chs, False, rngs, common)
        self.bn2 = _bn(cfg.out_chs, eps, common)
        self.drop_path = _drop_path(cfg.drop_path, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn1(self.conv_dw(x), activation=self.act_name)
        if self.se is not None:
            h = self.se(h)
        h = self.bn2(self.conv_pw(h), activation=self.act_name if self.pw_act else None)
        return self._finish(h, x)


class InvertedResidual(_Block):
    """timm ``ir``: ``conv_pw -> bn1(act) -> conv_dw -> bn2(act) -> se -> conv_pwl -> bn3`` (+ shortcut)."""

    def __init__(self, cfg: BlockCfg, *, padding: str, eps: float, impl: str = "auto",
                 rngs: nnx.Rngs, **common):
        self.has_skip, self.act_name = cfg.has_skip, cfg.act
        mid = cfg.mid_chs
        self.conv_pw = pointwise(cfg.in_chs, mid, False, rngs, common)
        self.bn1 = _bn(mid, eps, common)
        self.conv_dw = _dw(cfg, mid, padding, impl, common, rngs)
        self.bn2 = _bn(mid, eps, common)
        self.se = (SqueezeExcite(mid, cfg.se_chs, cfg.se_act, cfg.se_gate, rngs=rngs, **common)
                   if cfg.se_chs else None)
        self.conv_pwl = pointwise(mid, cfg.out_chs, False, rngs, common)
        self.bn3 = _bn(cfg.out_chs, eps, common)
        self.drop_path = _drop_path(cfg.drop_path, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn1(self.conv_pw(x), activation=self.act_name)
        h = self.bn2(self.conv_dw(h), activation=self.act_name)
        if self.se is not None:
            h = self.se(h)
        h = self.bn3(self.conv_pwl(h))
        return self._finish(h, x)


class ConvBnAct(_Block):
    """timm ``cn``: ``conv -> bn1(act)`` (the 1x1 last stage of MobileNetV3)."""

    def __init__(self, cfg: BlockCfg, *, padding: str, eps: float, impl: str = "auto",
                 rngs: nnx.Rngs, **common):
        self.has_skip, self.act_name = cfg.has_skip, cfg.act
        if cfg.kernel == 1 and cfg.stride == 1:
            self.conv = pointwise(cfg.in_chs, cfg.out_chs, False, rngs, common)
        else:
            self.conv = Conv(cfg.in_chs, cfg.out_chs, cfg.kernel, strides=cfg.stride,
                             kernel_dilation=cfg.dilation, padding=padding, use_bias=False,
                             kernel_init=conv_init, impl=impl, rngs=rngs, **common)
        self.bn1 = _bn(cfg.out_chs, eps, common)
        self.drop_path = _drop_path(cfg.drop_path, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._finish(self.bn1(self.conv(x), activation=self.act_name), x)


BLOCKS = {"ds": DepthwiseSeparableConv, "ir": InvertedResidual, "cn": ConvBnAct}
