"""Convolution modules (Flax NNX, channels-last ``(N, *spatial, C)``).

The spatial rank (1-D, 2-D or 3-D) is ``len(kernel_size)``; a bare int
``kernel_size`` means 2-D, and bare ints for ``strides`` / ``kernel_dilation``
are broadcast to that rank. Stride > 1 together with dilation > 1 is allowed.
Padding specs are documented in :mod:`jaxdsc.padding`.

Every module takes ``impl``: ``"auto"``, ``"xla"``, ``"shift"`` or ``"native"``
(a key of :data:`jaxdsc.ops.IMPL_TABLE`, which maps it to each op the module
runs: ``"xla"`` is the reference everywhere, ``"shift"`` pure JAX without
native kernels, ``"native"`` native kernels everywhere, CPU only), or a name
specific to the module's op (``Conv(impl="patches")``). ``"auto"`` follows the
active :func:`jaxdsc.ops.impl_policy`, then picks per platform.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxdsc import _checks
from jaxdsc._types import Dtype, check_float_input
from jaxdsc.activations import apply_activation, check_activation
from jaxdsc.norm import BatchNorm
from jaxdsc.ops import depthwise_conv, pointwise_conv
from jaxdsc.ops._select import check_impl, op_impl
from jaxdsc.ops.dense import DENSE_IMPLS, dense_conv
from jaxdsc.ops.depthwise import IMPLS, Pairs
from jaxdsc.ops.pointwise import PW_IMPLS
from jaxdsc.ops.separable import separable_conv
from jaxdsc.padding import PaddingLike, canonical_padding, resolve_padding

IntOrTuple = int | Sequence[int]
Initializer = nnx.Initializer

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()

_JNP_PAD_MODES = {"circular": "wrap", "reflect": "reflect", "replicate": "edge"}
_SPATIAL_NAMES = ("kernel_size", "strides", "kernel_dilation")


def pad_input(
    x: jax.Array,
    padding: str | tuple[tuple[int, int], ...],
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
    """Apply non-zero fill modes to ``x`` and return the zero padding still to do.

    Zero padding is left to the conv itself (no extra copy); circular, reflect
    and replicate padding are materialised with ``jnp.pad``.
    """
    pad = resolve_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    if pad.mode == "constant":
        return x, pad.pairs
    widths = ((0, 0), *pad.pairs, (0, 0))
    x = jnp.pad(x, widths, mode=_JNP_PAD_MODES[pad.mode])
    return x, tuple((0, 0) for _ in pad.pairs)


def _compute_dtype(dtype: Dtype | None, *arrays: jax.Array | None) -> jnp.dtype:
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*(a for a in arrays if a is not None))


class DepthwiseConv(nnx.Module):
    """Depthwise dilated convolution: each input channel convolved with its own filters.

    One ``lax.conv_general_dilated`` with ``feature_group_count=in_features``
    and ``rhs_dilation=kernel_dilation`` on the reference ``impl="xla"``
    path; faster paths with identical results are picked by ``impl="auto"``.

    Args:
      in_features: input channels ``C``.
      kernel_size: int (2-D) or tuple of 1-3 ints.
      depth_multiplier: filters per input channel ``M``; output has ``C * M``
        channels, channel ``o`` reading input channel ``o // M`` (PyTorch
        ``groups=C`` order).
      strides, kernel_dilation: int or tuple of the kernel's rank.
      padding: see :mod:`jaxdsc.padding`.
      impl: ``"auto"``, a name in :data:`jaxdsc.ops.IMPLS` or of :data:`jaxdsc.ops.IMPL_TABLE`.

    Shapes: ``(N, *spatial, C) -> (N, *out_spatial, C * M)``; kernel
    ``(*kernel_size, 1, C * M)``.
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: IntOrTuple,
        *,
        depth_multiplier: int = 1,
        strides: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        kernel_dilation: IntOrTuple = 1,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.depth_multiplier = _checks.positive_int("depth_multiplier", depth_multiplier)
        self.kernel_size, self.strides, self.kernel_dilation = _checks.spatial_args(
            kernel_size, strides, kernel_dilation, names=_SPATIAL_NAMES
        )
        self.padding = canonical_padding(padding, len(self.kernel_size))
        self.use_bias = _checks.boolean("use_bias", use_bias)
        self.impl = check_impl("depthwise", impl, sorted(IMPLS))
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.out_features = self.in_features * self.depth_multiplier
        shape = (*self.kernel_size, 1, self.out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
            if self.use_bias
            else None
        )

    def _prepare(self, x: jax.Array, *others: jax.Array | None) -> tuple[jax.Array, Pairs, jnp.dtype]:
        """Checked and padded input, its zero-padding pairs and the compute dtype (of x, the
        kernel, the bias and ``others``, unless ``dtype`` is set)."""
        check_float_input(x)
        _checks.input_layout(
            x.shape, rank=len(self.kernel_size), channels=self.in_features, channels_last=True
        )
        bias = self.bias[...] if self.bias is not None else None
        dtype = _compute_dtype(self.dtype, x, self.kernel[...], bias, *others)
        x, pairs = pad_input(x, self.padding, self.kernel_size, self.strides, self.kernel_dilation)
        return x, pairs, dtype

    def _kernel(self) -> jax.Array:
        """The kernel the forward uses (a reparametrisation, e.g. weight norm, overrides this)."""
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        x, pairs, dtype = self._prepare(x)
        bias = self.bias[...] if self.bias is not None else None
        y = depthwise_conv(
            x.astype(dtype),
            self._kernel().astype(dtype),
            strides=self.strides,
            padding=pairs,
            dilation=self.kernel_dilation,
            impl=op_impl("depthwise", self.impl),
            precision=self.precision,
        )
        if bias is not None:
            y = y + bias.astype(dtype)
        return y


class PointwiseConv(nnx.Module):
    """The 1x1 convolution, computed as a matmul over the channel axis.

    Args:
      in_features, out_features: channel counts.
      num_spatial_dims: spatial rank of the inputs (1-3); fixes the PyTorch
        twin's weight shape ``(out, in, 1, ...)``.
      impl: ``"auto"``, ``"xla"``, ``"native"`` or a key of :data:`jaxdsc.ops.IMPL_TABLE`.

    Shapes: ``(N, *spatial, in) -> (N, *spatial, out)``; kernel ``(in, out)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        num_spatial_dims: int = 2,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        self.use_bias = _checks.boolean("use_bias", use_bias)
        self.impl = check_impl("pointwise", impl, PW_IMPLS)
        self.num_spatial_dims = _checks.positive_int("num_spatial_dims", num_spatial_dims)
        if self.num_spatial_dims > 3:
            raise ValueError(f"num_spatial_dims must be 1, 2 or 3, got {num_spatial_dims!r}")
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.kernel = nnx.Param(kernel_init(rngs.params(), (self.in_features, self.out_features), param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
            if self.use_bias
            else None
        )

    def _kernel(self) -> jax.Array:
        """The kernel the forward uses (a reparametrisation, e.g. weight norm, overrides this)."""
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        check_float_input(x)
        _checks.input_layout(
            x.shape, rank=self.num_spatial_dims, channels=self.in_features, channels_last=True
        )
        bias = self.bias[...] if self.bias is not None else None
        dtype = _compute_dtype(self.dtype, x, self.kernel[...], bias)
        return pointwise_conv(
            x.astype(dtype),
            self._kernel().astype(dtype),
            None if bias is None else bias.astype(dtype),
            precision=self.precision,
            impl=op_impl("pointwise", self.impl),
        )


class SeparableConv(nnx.Module):
    """Depthwise-separable dilated conv: ``depthwise`` then ``pointwise``.

    ``mid_norm="batch"`` and ``mid_activation`` insert a BatchNorm and an
    activation between the two (Xception / MobileNet style); the depthwise
    conv then has no bias (the norm's shift replaces it).

    ``merge="concat"`` is "merge and scale": the depthwise output ``h`` (after
    the optional norm/activation) and the pointwise output ``p`` are
    concatenated along channels and mapped to ``out_features`` by a learned
    1x1 projection ``project``: ``y = project(concat(h, p))``.

    Shapes: ``(N, *spatial, in_features) -> (N, *out_spatial, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: IntOrTuple,
        *,
        strides: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        kernel_dilation: IntOrTuple = 1,
        depth_multiplier: int = 1,
        use_bias: bool = True,
        mid_norm: str | None = None,
        mid_activation: str | None = None,
        merge: str | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        self.mid_norm = _checks.choice("mid_norm", mid_norm, (None, "batch"))
        self.mid_activation = check_activation("mid_activation", mid_activation)
        self.merge = _checks.choice("merge", merge, (None, "concat"))
        self.use_bias = _checks.boolean("use_bias", use_bias)
        check_impl("depthwise", impl, sorted(IMPLS))
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                      kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.depthwise = DepthwiseConv(
            in_features, kernel_size, depth_multiplier=depth_multiplier, strides=strides,
            padding=padding, kernel_dilation=kernel_dilation,
            use_bias=use_bias and mid_norm is None, impl=impl, **common,
        )
        # Mirror the normalised sub-config so a config round trip is exact.
        self.kernel_size = self.depthwise.kernel_size
        self.strides = self.depthwise.strides
        self.kernel_dilation = self.depthwise.kernel_dilation
        self.padding = self.depthwise.padding
        self.depth_multiplier = self.depthwise.depth_multiplier
        self.impl = impl
        mid = self.depthwise.out_features
        rank = len(self.kernel_size)
        pw_impl = op_impl("pointwise", impl)
        self.norm = (BatchNorm(mid, dtype=dtype, param_dtype=param_dtype, impl=op_impl("batchnorm", impl))
                     if mid_norm else None)
        self.pointwise = PointwiseConv(
            mid, out_features, use_bias=use_bias, num_spatial_dims=rank, impl=pw_impl, **common
        )
        self.project = (
            PointwiseConv(mid + out_features, out_features, use_bias=use_bias,
                          num_spatial_dims=rank, impl=pw_impl, **common)
            if merge == "concat"
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm is None and self.mid_activation is None and self.project is None:
            return self._plain(x)
        h = self.depthwise(x)
        if self.norm is not None:
            h = self.norm(h, activation=self.mid_activation)  # a ReLU fuses into train mode
        else:
            h = apply_activation(self.mid_activation, h)
        y = self.pointwise(h)
        if self.project is not None:
            y = self.project(jnp.concatenate([h, y.astype(h.dtype)], axis=-1))
        return y

    def _plain(self, x: jax.Array) -> jax.Array:
        """``pointwise(depthwise(x))`` as one op: its forward is fused on CPU (jaxdsc.ops.separable)."""
        dw, pw = self.depthwise, self.pointwise
        dw_bias = dw.bias[...] if dw.bias is not None else None
        pw_bias = pw.bias[...] if pw.bias is not None else None
        x, pairs, dtype = dw._prepare(x, pw.kernel[...], pw_bias)
        return separable_conv(
            x.astype(dtype), dw.kernel[...].astype(dtype), pw.kernel[...].astype(dtype),
            None if dw_bias is None else dw_bias.astype(dtype),
            None if pw_bias is None else pw_bias.astype(dtype), strides=dw.strides, padding=pairs,
            dilation=dw.kernel_dilation, impl=self.impl, precision=dw.precision,
        )


class Conv(nnx.Module):
    """A plain (dense, ``groups=1``) convolution with the same padding rules, e.g. a stem.

    ``impl``: ``"auto"``, ``"xla"`` (``lax.conv_general_dilated``, the
    reference), ``"native"`` (the native GEMM over implicit im2col rows; what
    ``"auto"`` picks on CPU) or ``"patches"`` (im2col in memory + one GEMM),
    see :mod:`jaxdsc.ops.dense`; or a key of :data:`jaxdsc.ops.IMPL_TABLE`.

    Shapes: ``(N, *spatial, in) -> (N, *out_spatial, out)``; kernel
    ``(*kernel_size, in, out)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: IntOrTuple,
        *,
        strides: IntOrTuple = 1,
        padding: PaddingLike = "SAME",
        kernel_dilation: IntOrTuple = 1,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        self.impl = check_impl("dense", impl, DENSE_IMPLS)
        self.kernel_size, self.strides, self.kernel_dilation = _checks.spatial_args(
            kernel_size, strides, kernel_dilation, names=_SPATIAL_NAMES
        )
        self.padding = canonical_padding(padding, len(self.kernel_size))
        self.use_bias = _checks.boolean("use_bias", use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        shape = (*self.kernel_size, self.in_features, self.out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
            if self.use_bias
            else None
        )

    def _kernel(self) -> jax.Array:
        """The kernel the forward uses (a reparametrisation, e.g. weight norm, overrides this)."""
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        check_float_input(x)
        rank = len(self.kernel_size)
        _checks.input_layout(x.shape, rank=rank, channels=self.in_features, channels_last=True)
        bias = self.bias[...] if self.bias is not None else None
        dtype = _compute_dtype(self.dtype, x, self.kernel[...], bias)
        x, pairs = pad_input(x, self.padding, self.kernel_size, self.strides, self.kernel_dilation)
        y = dense_conv(
            x.astype(dtype), self._kernel().astype(dtype), strides=self.strides, padding=pairs,
            dilation=self.kernel_dilation, precision=self.precision, impl=op_impl("dense", self.impl),
        )
        if bias is not None:
            y = y + bias.astype(dtype)
        return y
