"""TCN: a temporal convolutional network of causal dilated (separable) convolutions.

The structure is Bai, Kolter and Koltun 2018 ("An Empirical Evaluation of
Generic Convolutional and Recurrent Networks for Sequence Modeling", code at
locuslab/TCN): one residual block per level ``i`` with dilation ``2**i``, each
block two causal dilated convs, every conv followed by (weight norm on its
kernel) ReLU and dropout; a 1x1 conv on the residual path where the widths
differ, a ReLU after the sum; a linear map per time step at the end.

``separable=True`` replaces each dense conv by a depthwise dilated causal conv
(:class:`jaxdsc.DepthwiseConv`, ``padding="CAUSAL"``) and a pointwise conv,
both weight-normed. ``gated=True`` is the gated variant of the paper's gating
comparison: each conv produces twice the channels and a gated linear unit
(Dauphin et al. 2017: ``a * sigmoid(b)``) replaces the ReLU after it.

Everything is channels-last, ``(N, T, C)``. :meth:`TCN.init_cache` and
:meth:`TCN.step` run the same network one time step at a time (WaveNet-style
queues holding each conv's last ``(k - 1) * d`` inputs); :meth:`TCN.last`
computes the last step's output alone (sequence-to-one tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdsc import _checks
from jaxdsc._types import Dtype, check_float_input
from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv, _compute_dtype
from jaxdsc.models._registry import register_model
from jaxdsc.ops._select import op_impl
from jaxdsc.ops.dense import dense_conv
from jaxdsc.ops.separable import separable_conv

Cache = tuple[tuple[jax.Array, jax.Array], ...]
"""Streaming state: per block, the input queues ``(N, (k-1)*d, C)`` of its two convs."""

# Initialisation: what locuslab/TCN effectively runs. Its N(0, 0.01) draw for the convs happens after
# weight_norm wraps them, and weight_norm's hook recomputes the weight from (g, v) on every forward, so the
# convs keep PyTorch's default init (locuslab/TCN#1, acknowledged by its authors); the 1x1 downsample and
# the final linear, not weight-normed, do get N(0, 0.01) weights. The N(0, 0.01) convs stalled training:
# separable TCN on the adding task (T=50) still at the constant predictor's MSE after 1600 Adam steps,
# 0.005 with this init.
_LINEAR_STD = 0.01

# The separable convs have no locuslab counterpart. Their depthwise kernels are drawn with variance 1/fan_in
# (U(+-sqrt(3/k))), 3x PyTorch's default, so depthwise then pointwise (default init) keeps the output scale of
# the dense conv it replaces (variance x 1/3 for either); with both at PyTorch's default each separable conv
# shrinks it 3x more. On the copy task (T=1000, 8 levels) that cost 30x in the gradient reaching the first
# inputs from the last outputs at init (docs/sequences.md).
DEPTHWISE_INIT_GAIN = math.sqrt(3.0)


def _torch_default_kernel() -> nnx.Initializer:
    """PyTorch's conv default (kaiming_uniform, a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in), channels-last."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)


def _depthwise_kernel() -> nnx.Initializer:
    """``DEPTHWISE_INIT_GAIN`` x PyTorch's conv default: U(-b, b), b = sqrt(3 / fan_in) (fan_in: the taps)."""
    return nnx.initializers.variance_scaling(DEPTHWISE_INIT_GAIN**2 / 3.0, "fan_in", "uniform", in_axis=-2,
                                             out_axis=-1)


def _torch_default_bias(fan_in: int) -> nnx.Initializer:
    """PyTorch's conv / linear bias default: U(-b, b), b = 1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def weight_norm(v: jax.Array, g: jax.Array) -> jax.Array:
    """``g * v / ||v||``, the norm over all axes but the last (output channels).

    This is ``torch.nn.utils.parametrizations.weight_norm(dim=0)`` in our
    channels-last kernel layouts; ``g`` has ``v``'s rank with size 1 on every
    axis but the last.
    """
    axes = tuple(range(v.ndim - 1))
    return v * (g / jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True)))


class _WeightNorm:
    """Mixin: the layer's ``kernel`` is the direction ``v``, ``gain`` its per-output norm ``g``.

    At initialisation ``g = ||v||``, so the effective kernel equals the
    initial ``v`` (as PyTorch's ``weight_norm``).
    """

    def _init_gain(self) -> None:
        v = self.kernel[...]
        axes = tuple(range(v.ndim - 1))
        self.gain = nnx.Param(jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True)))

    def _kernel(self) -> jax.Array:
        return weight_norm(self.kernel[...], self.gain[...])


class WeightNormDepthwiseConv(_WeightNorm, DepthwiseConv):
    """:class:`jaxdsc.DepthwiseConv` with a weight-normed kernel (``gain`` ``(1, ..., 1, C*M)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gain()


class WeightNormPointwiseConv(_WeightNorm, PointwiseConv):
    """:class:`jaxdsc.PointwiseConv` with a weight-normed kernel (``gain`` ``(1, out)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gain()


class WeightNormConv(_WeightNorm, Conv):
    """:class:`jaxdsc.Conv` with a weight-normed kernel (``gain`` ``(1, ..., 1, out)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gain()


class CausalConv(nnx.Module):
    """One causal dilated conv of a TCN block: depthwise + pointwise, or dense.

    Shapes: ``(N, T, in_features) -> (N, T, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        dilation: int = 1,
        separable: bool = True,
        weight_norm: bool = True,
        impl: str = "auto",
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        self.kernel_size = _checks.positive_int("kernel_size", kernel_size)
        self.dilation = _checks.positive_int("dilation", dilation)
        self.separable = _checks.boolean("separable", separable)
        self.weight_norm = _checks.boolean("weight_norm", weight_norm)
        common = dict(kernel_init=_torch_default_kernel(), param_dtype=param_dtype, rngs=rngs)
        k, d = (self.kernel_size,), (self.dilation,)
        if separable:
            dw_cls = WeightNormDepthwiseConv if weight_norm else DepthwiseConv
            pw_cls = WeightNormPointwiseConv if weight_norm else PointwiseConv
            self.depthwise = dw_cls(in_features, k, padding="CAUSAL", kernel_dilation=d, impl=impl,
                                    bias_init=_torch_default_bias(kernel_size),
                                    **(common | dict(kernel_init=_depthwise_kernel())))
            self.pointwise = pw_cls(in_features, out_features, num_spatial_dims=1,
                                    bias_init=_torch_default_bias(in_features), **common)
            self.conv = None
        else:
            conv_cls = WeightNormConv if weight_norm else Conv
            self.depthwise = self.pointwise = None
            self.conv = conv_cls(in_features, out_features, k, padding="CAUSAL", kernel_dilation=d,
                                 bias_init=_torch_default_bias(kernel_size * in_features), **common)

    @property
    def history(self) -> int:
        """Past inputs one output reads besides the current one: ``(k - 1) * d``."""
        return (self.kernel_size - 1) * self.dilation

    def __call__(self, x: jax.Array, *, dilation: int | None = None) -> jax.Array:
        """``dilation`` overrides the layer's (causal padding ``(k - 1) * dilation``): :meth:`TCN.last`
        runs a conv of dilation ``d`` as dilation 1 on every ``d``-th time step."""
        dilation = self.dilation if dilation is None else dilation
        pairs = (((self.kernel_size - 1) * dilation, 0),)
        if self.conv is not None:
            c = self.conv
            check_float_input(x)  # Conv.__call__'s checks and dtype rule, at any dilation
            _checks.input_layout(x.shape, rank=1, channels=self.in_features, channels_last=True)
            dtype = _compute_dtype(c.dtype, x, c.kernel[...], c.bias[...])
            y = dense_conv(x.astype(dtype), c._kernel().astype(dtype), strides=(1,), padding=pairs,
                           dilation=(dilation,), precision=c.precision, impl=op_impl("dense", c.impl))
            return y + c.bias[...].astype(dtype)
        dw, pw = self.depthwise, self.pointwise
        x, _, dtype = dw._prepare(x, pw.kernel[...])
        # One op: its forward is fused on CPU (jaxdsc.ops.separable), as SeparableConv does.
        return separable_conv(
            x.astype(dtype), dw._kernel().astype(dtype), pw._kernel().astype(dtype),
            dw.bias[...].astype(dtype), pw.bias[...].astype(dtype), strides=dw.strides,
            padding=pairs, dilation=(dilation,), impl=dw.impl, precision=dw.precision,
        )

    def init_cache(self, batch: int, dtype: Dtype = jnp.float32) -> jax.Array:
        """An all-zero input queue ``(batch, history, in_features)`` (the causal padding)."""
        return jnp.zeros((batch, self.history, self.in_features), dtype)

    def step(self, queue: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One time step: ``x_t`` ``(N, in_features)`` -> (new queue, ``y_t`` ``(N, out_features)``)."""
        window = jnp.concatenate([queue, x_t[:, None, :].astype(queue.dtype)], axis=1)
        taps = window[:, :: self.dilation]  # (N, k, C): the inputs the kernel's k taps read
        if self.conv is not None:
            y = jnp.einsum("nkc,kco->no", taps, self.conv._kernel()) + self.conv.bias[...]
        else:
            dw, pw = self.depthwise, self.pointwise
            h = jnp.einsum("nkc,kc->nc", taps, dw._kernel()[:, 0, :]) + dw.bias[...]
            y = h @ pw._kernel() + pw.bias[...]
        return window[:, 1:], y


def _glu(h: jax.Array) -> jax.Array:
    a, b = jnp.split(h, 2, axis=-1)
    return a * jax.nn.sigmoid(b)


def _dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return h
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


class TemporalBlock(nnx.Module):
    """``relu(x' + drop(act(conv2(drop(act(conv1(x)))))))``, ``x'`` = ``x`` or its 1x1 conv.

    ``act`` is ReLU, or a gated linear unit when ``gated`` (the convs then
    produce ``2 * out_features`` channels). ``dense_conv1`` makes ``conv1``
    dense when ``separable`` (a TCN's stem, see :class:`TCN`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        dilation: int,
        separable: bool = True,
        dense_conv1: bool = False,
        weight_norm: bool = True,
        gated: bool = False,
        dropout: float = 0.0,
        impl: str = "auto",
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.dilation = kernel_size, dilation
        self.separable, self.weight_norm = separable, weight_norm
        self.dense_conv1 = _checks.boolean("dense_conv1", dense_conv1)
        self.gated = _checks.boolean("gated", gated)
        self.dropout = dropout
        width = 2 * out_features if gated else out_features
        common = dict(dilation=dilation, weight_norm=weight_norm, impl=impl, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = CausalConv(in_features, width, kernel_size, separable=separable and not dense_conv1, **common)
        self.conv2 = CausalConv(out_features, width, kernel_size, separable=separable, **common)
        self.downsample = (
            PointwiseConv(in_features, out_features, num_spatial_dims=1, param_dtype=param_dtype,
                          kernel_init=nnx.initializers.normal(_LINEAR_STD),
                          bias_init=_torch_default_bias(in_features), rngs=rngs)
            if in_features != out_features
            else None
        )

    def _act(self, h: jax.Array) -> jax.Array:
        return _glu(h) if self.gated else jax.nn.relu(h)

    def _merge(self, x: jax.Array, h: jax.Array) -> jax.Array:
        res = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(h + res)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None, dilation: int | None = None) -> jax.Array:
        """``(N, T, in) -> (N, T, out)``; dropout only with a ``key``; ``dilation`` overrides the convs'."""
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        h = _dropout(self._act(self.conv1(x, dilation=dilation)), self.dropout, k1)
        h = _dropout(self._act(self.conv2(h, dilation=dilation)), self.dropout, k2)
        return self._merge(x, h)

    def step(self, queues: tuple[jax.Array, jax.Array], x_t: jax.Array):
        """One time step of :meth:`__call__` without dropout: ``(N, in)`` -> (queues, ``(N, out)``)."""
        q1, h = self.conv1.step(queues[0], x_t)
        q2, h = self.conv2.step(queues[1], self._act(h))
        return (q1, q2), self._merge(x_t[:, None], self._act(h)[:, None])[:, 0]


class TCN(nnx.Module):
    """Temporal convolutional network, ``(N, T, in_features) -> (N, T, out_features)``.

    Args:
      in_features: input channels per time step.
      out_features: outputs per time step (the final linear map).
      channels: width of each level; level ``i`` has dilation ``2**i``.
      kernel_size: taps of every causal conv.
      separable: depthwise + pointwise convs (True) or dense convs (the paper's).
      dense_stem: with ``separable``, the first conv (level 0's ``conv1``, which
        reads the raw input) dense. A depthwise conv learns one temporal filter
        per input channel, so on a 1- or 2-channel input (copy, adding) every
        first-level channel is a multiple of the same one or two filtered
        signals; the dense conv costs about the same there.
      dropout: rate after every conv's activation, active in train mode when a
        ``key`` is given to ``__call__``.
      weight_norm: weight-normed conv kernels (PyTorch ``weight_norm(dim=0)``).
      gated: gated linear units instead of ReLU after each conv.
      impl: depthwise implementation (``"auto"``, ``"native"``, ``"shift"``, ``"xla"``).

    The receptive field is ``1 + 2 * (kernel_size - 1) * (2**len(channels) - 1)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        channels: Sequence[int],
        *,
        kernel_size: int = 2,
        separable: bool = True,
        dense_stem: bool = False,
        dropout: float = 0.0,
        weight_norm: bool = True,
        gated: bool = False,
        impl: str = "auto",
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
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
        self.impl = impl
        self.deterministic = False  # nnx's .eval() / .train() switch dropout via this flag
        widths = (self.in_features, *self.channels)
        self.blocks = nnx.List([
            TemporalBlock(widths[i], widths[i + 1], self.kernel_size, dilation=2**i, separable=separable,
                          dense_conv1=self.dense_stem and i == 0, weight_norm=weight_norm, gated=gated,
                          dropout=self.dropout, impl=impl, param_dtype=param_dtype, rngs=rngs)
            for i in range(len(self.channels))
        ])
        self.linear = nnx.Linear(self.channels[-1], self.out_features, param_dtype=param_dtype,
                                 kernel_init=nnx.initializers.normal(_LINEAR_STD),
                                 bias_init=_torch_default_bias(self.channels[-1]), rngs=rngs)

    def _block_keys(self, key: jax.Array | None) -> list[jax.Array | None]:
        """One dropout key per block (none in eval mode or without ``key``)."""
        if key is None or self.deterministic:
            return [None] * len(self.blocks)
        return list(jax.random.split(key, len(self.blocks)))

    @property
    def receptive_field(self) -> int:
        return 1 + 2 * (self.kernel_size - 1) * (2 ** len(self.channels) - 1)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Outputs ``(N, T, out_features)``; ``key`` drives dropout in train mode (none without it)."""
        keys = self._block_keys(key)
        h = x
        for block, k in zip(self.blocks, keys, strict=True):
            h = block(h, key=k)
        return self.linear(h)

    def last(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """The output at the last time step, ``self(x)[:, -1]`` ``(N, out_features)``, at a fraction of the work.

        The last output reads level ``i`` only at the steps ``T - 1 - m * 2**i``,
        so level ``i`` runs on every ``2**i``-th step, where its dilation-``2**i``
        convs are dilation-1 convs: level ``i`` costs ``1 / 2**i`` of the full
        forward's, the whole network about ``2 / len(channels)`` of it. The same
        function and gradients as the full forward (sequence-to-one tasks, e.g.
        the adding problem); dropout draws its masks for the steps computed only.
        """
        if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] != self.in_features:
            raise ValueError(f"x must have shape (N, T >= 1, {self.in_features}), got {tuple(x.shape)}")
        keys = self._block_keys(key)
        h, spacing = x, 1  # h holds the steps T - 1 - m * spacing, oldest first
        for block, k in zip(self.blocks, keys, strict=True):
            r = block.dilation // spacing
            h = h[:, (h.shape[1] - 1) % r::r]
            spacing = block.dilation
            h = block(h, key=k, dilation=1)
        return self.linear(h[:, -1])

    def init_cache(self, batch: int, dtype: Dtype = jnp.float32) -> Cache:
        """Zeroed streaming state for ``batch`` sequences (as the causal zero padding)."""
        _checks.positive_int("batch", batch)
        return tuple((b.conv1.init_cache(batch, dtype), b.conv2.init_cache(batch, dtype)) for b in self.blocks)

    def step(self, cache: Cache, x_t: jax.Array) -> tuple[Cache, jax.Array]:
        """One time step (inference, no dropout): ``x_t`` ``(N, in_features)`` -> (cache, ``(N, out_features)``).

        Feeding ``x[:, 0], x[:, 1], ...`` from :meth:`init_cache` gives
        ``self(x)[:, 0], self(x)[:, 1], ...``. Pure in ``cache``: jit it with
        ``nnx.jit`` or split the module first.
        """
        if x_t.ndim != 2 or x_t.shape[-1] != self.in_features:
            raise ValueError(f"x_t must have shape (N, {self.in_features}), got {tuple(x_t.shape)}")
        if len(cache) != len(self.blocks):
            raise ValueError(f"cache must hold {len(self.blocks)} blocks' queues, got {len(cache)}")
        new, h = [], x_t
        for block, queues in zip(self.blocks, cache, strict=True):
            queues, h = block.step(queues, h)
            new.append(queues)
        return tuple(new), self.linear(h)


@register_model("jaxdsc:tcn")
def tcn(*, rngs: nnx.Rngs, **kwargs) -> TCN:
    """:class:`TCN` with its constructor's keyword arguments."""
    return TCN(rngs=rngs, **kwargs)
