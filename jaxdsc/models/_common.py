"""Small pieces shared by the zoo models (torchvision / timm architectures in Flax NNX).

The zoo models mirror the upstream PyTorch module trees name for name, so that
``torch_bridge``'s generic walker finds the upstream state-dict keys:
:class:`Sequential` plays ``nn.Sequential`` (items ``0``, ``1``, ...), the
activation and pooling modules here are stateless (the walker skips them) and
every layer holding state is a jaxdsc layer the bridge's table knows
(:class:`jaxdsc.Conv`, :class:`jaxdsc.DepthwiseConv`, :class:`jaxdsc.PointwiseConv`,
:class:`jaxdsc.BatchNorm`, ``nnx.Linear``). Everything is channels-last (NHWC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv
from jaxdsc.norm import BatchNorm


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's / TF-slim's ``_make_divisible``: round ``v`` to a multiple of ``divisor``,
    never below ``min_value`` and never more than 10% below ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def torch_momentum(momentum: float) -> float:
    """A torch BatchNorm momentum (weight of the new statistic) in the Flax convention."""
    return round(1.0 - float(momentum), 12)


# ---------------------------------------------------------------- stateless modules
class Activation(nnx.Module):
    """Base of the stateless activation modules (one per upstream ``nn.*`` activation)."""

    def __call__(self, x: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


class ReLU(Activation):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class ReLU6(Activation):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.clip(x, 0, 6).astype(x.dtype)


class Hardsigmoid(Activation):
    """``relu6(x + 3) / 6`` as ``torch.nn.Hardsigmoid``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.hard_sigmoid(x)


class Hardswish(Activation):
    """``x * relu6(x + 3) / 6`` as ``torch.nn.Hardswish``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.hard_swish(x)


class SiLU(Activation):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(x)


class Sigmoid(Activation):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(x)


class Identity(Activation):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


ACTIVATIONS: dict[str, type[Activation]] = {
    "relu": ReLU, "relu6": ReLU6, "hardsigmoid": Hardsigmoid, "hardswish": Hardswish,
    "silu": SiLU, "sigmoid": Sigmoid, "identity": Identity,
}


def activation(name: str | None) -> Activation:
    """The stateless activation module called ``name`` (None: identity)."""
    if name is None:
        return Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class AdaptiveAvgPool1(nnx.Module):
    """``nn.AdaptiveAvgPool2d(1)`` in NHWC, keeping the spatial axes: ``(N, H, W, C) -> (N, 1, 1, C)``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return global_avg_pool(x, keepdims=True)


def global_avg_pool(x: jax.Array, *, keepdims: bool = False) -> jax.Array:
    """Mean over the spatial axes of ``(N, *spatial, C)``, accumulated in at least float32."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.mean(x.astype(acc), axis=tuple(range(1, x.ndim - 1)), keepdims=keepdims).astype(x.dtype)


class Sequential(nnx.List):
    """``nn.Sequential``: items ``0, 1, ...`` called in order (a transparent container for the bridge)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class FeatureSequential(Sequential):
    """The ``features`` ``nn.Sequential`` of a torchvision classifier, returning its multi-scale maps.

    Called on ``x`` it runs every item in order and returns the list of the outputs of the last
    item before each downsampling (``strides[i + 1] > 1``) and of the last item, so
    ``model.features(x)`` gives the maps at strides 2, 4, 8, 16, 32 (fewer where dilation
    replaces a stride) and ``model.features(x)[-1]`` is upstream's ``model.features(x)``.
    """

    def __init__(self, layers: Sequence[nnx.Module], strides: Sequence[int]):
        super().__init__(layers)
        if len(strides) != len(layers):
            raise ValueError(f"strides must have one entry per layer ({len(layers)}), got {len(strides)}")
        self.taps = tuple(i for i in range(len(strides)) if i + 1 == len(strides) or strides[i + 1] > 1)

    def __call__(self, x: jax.Array) -> list[jax.Array]:  # type: ignore[override]
        out = []
        for i, layer in enumerate(self):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class StochasticDepth(nnx.Module):
    """torchvision's ``StochasticDepth(p, mode)``: in training, zero the input per sample
    (``"row"``) or as a whole (``"batch"``) with probability ``p`` and scale the survivors by
    ``1 / (1 - p)``; the identity in eval mode (``deterministic``, set by ``eval()``) or for
    ``p == 0``. Randomness comes from the ``rngs`` stream ``"dropout"`` (forked at build time)."""

    def __init__(self, p: float, mode: str = "row", *, rngs: nnx.Rngs, deterministic: bool = False):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, got p={p!r}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        self.p, self.mode, self.deterministic = float(p), mode, deterministic
        self.rngs = rngs["dropout"].fork()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
        keep = jax.random.bernoulli(self.rngs(), survival, shape)
        scale = 1.0 / survival if survival > 0.0 else 0.0
        return x * (keep.astype(x.dtype) * jnp.asarray(scale, x.dtype))


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` in NHWC (half-pixel
    centres, no antialiasing: jax.image's ``"bilinear"`` with ``antialias=False``)."""
    n, _, _, c = x.shape
    out = jax.image.resize(x, (n, int(size[0]), int(size[1]), c), "bilinear", antialias=False)
    return out.astype(x.dtype)


# ---------------------------------------------------------------- layers with state
@dataclass(frozen=True)
class Layers:
    """Builds the stateful layers of one model with its shared options (dtypes, ``impl``, rngs)."""

    rngs: nnx.Rngs
    dtype: Any = None
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    def conv(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, *, groups: int = 1,
             dilation: int = 1, padding: int | None = None, bias: bool = False) -> nnx.Module:
        """``nn.Conv2d`` with symmetric zero padding (``(k - 1) // 2 * d`` unless given), as the
        jaxdsc layer that holds it: dense (``groups=1``), depthwise (``groups == in_ch``) or a
        pointwise matmul (1x1, stride 1, no padding). Other ``groups`` are refused."""
        pad = (kernel_size - 1) // 2 * dilation if padding is None else padding
        common = dict(use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)
        if groups == 1 and kernel_size == 1 and stride == 1 and pad == 0:
            return PointwiseConv(in_ch, out_ch, **common)
        geometry = dict(strides=stride, padding=pad, kernel_dilation=dilation)
        if groups == 1:
            # Dense convs have their own impls; "xla" (the reference) is shared.
            return Conv(in_ch, out_ch, kernel_size, impl="xla" if self.impl == "xla" else "auto",
                        **geometry, **common)
        if groups == in_ch and out_ch % in_ch == 0:
            return DepthwiseConv(in_ch, kernel_size, depth_multiplier=out_ch // in_ch, impl=self.impl,
                                 **geometry, **common)
        raise ValueError(f"groups={groups} with {in_ch} input channels: only dense (groups=1) and "
                         f"depthwise (groups=in_channels) convolutions are supported")

    def bn(self, c: int, eps: float = 1e-5, momentum: float = 0.1) -> BatchNorm:
        """``nn.BatchNorm2d(c, eps, momentum)`` (torch momentum convention)."""
        return BatchNorm(c, epsilon=eps, momentum=torch_momentum(momentum), dtype=self.dtype,
                         param_dtype=self.param_dtype)

    def linear(self, in_f: int, out_f: int) -> nnx.Linear:
        return nnx.Linear(in_f, out_f, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

    def dropout(self, p: float) -> nnx.Dropout:
        return nnx.Dropout(p, rngs=self.rngs)

    def conv_norm_act(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, *,
                      groups: int = 1, dilation: int = 1, act: str | None = "relu",
                      eps: float = 1e-5, momentum: float = 0.1) -> Sequential:
        """torchvision's ``Conv2dNormActivation``: ``0`` conv (no bias), ``1`` BatchNorm, ``2`` activation."""
        layers: list[nnx.Module] = [
            self.conv(in_ch, out_ch, kernel_size, stride, groups=groups, dilation=dilation),
            self.bn(out_ch, eps, momentum),
        ]
        if act is not None:
            layers.append(activation(act))
        return Sequential(layers)


class SqueezeExcitation(nnx.Module):
    """torchvision's ``SqueezeExcitation``: ``x * scale_activation(fc2(activation(fc1(avgpool(x)))))``
    with 1x1 convs ``fc1`` / ``fc2`` (biased)."""

    def __init__(self, input_channels: int, squeeze_channels: int, *, layers: Layers,
                 activation_name: str = "relu", scale_activation: str = "sigmoid"):
        self.avgpool = AdaptiveAvgPool1()
        self.fc1 = layers.conv(input_channels, squeeze_channels, 1, bias=True)
        self.fc2 = layers.conv(squeeze_channels, input_channels, 1, bias=True)
        self.activation = activation(activation_name)
        self.scale_activation = activation(scale_activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


def check_dropout(name: str, p: Any) -> float:
    """A probability in ``[0, 1]`` (dropout, stochastic depth)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0 or math.isnan(p):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def check_none(name: str, value: Any) -> None:
    """Upstream arguments that take classes/callables (``block``, ``norm_layer``): only None."""
    if value is not None:
        raise ValueError(f"{name} must be None (the upstream default); custom {name} is not supported, "
                         f"got {value!r}")
