"""Exact parameter and multiply-add formulas per layer type.

Conventions (the ones of PyTorch's ``torch.utils.flop_counter``, fvcore and
the papers, so figures compare across tools):

* A conv costs ``prod(kernel_size) * in_channels / groups`` multiply-adds per
  output element, taps over the zero padding included. XLA's
  ``cost_analysis()`` skips the taps that fall on padding: its ``flops`` equal
  ``2 * MACs`` exactly for ``"VALID"`` convs and are a little lower for padded
  ones (``tests/test_summary.py`` checks both, with an exact count of the
  padded taps). Bias additions are not multiply-adds and are not counted.
* A linear layer costs ``in * out`` per output row.
* A per-channel affine (``BatchNorm``, ``Normalize``) costs one multiply-add
  per output element (at inference it is ``x * a + b``; folded into the
  preceding conv it would cost nothing). Activations, residual additions,
  pooling and resizing are not multiply-adds and count 0.
* Parameters are the elements of ``nnx.Param`` variables (BatchNorm running
  statistics and ``Normalize`` constants are buffers, not parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx

from jaxdsc.blocks import ConvBlock, SeparableBlock
from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv, SeparableConv
from jaxdsc.norm import BatchNorm, Normalize

Shape = tuple[int, ...]

LEAF_TYPES: tuple[type, ...] = (
    Conv, DepthwiseConv, PointwiseConv, SeparableConv, BatchNorm, Normalize,
    nnx.Linear, nnx.Conv, nnx.BatchNorm,
)
"""Layers counted by formula; the modules they call are not rows of their own."""


def param_count(module: nnx.Module) -> int:
    """Elements of every ``nnx.Param`` in ``module``'s subtree."""
    leaves = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return sum(math.prod(v.get_value().shape) for _, v in leaves)


def conv_macs(out_shape: Shape, kernel_size: Sequence[int], in_per_group: int) -> int:
    """Multiply-adds of a conv whose output (channels last) is ``out_shape``."""
    return math.prod(out_shape) * math.prod(kernel_size) * in_per_group


def leaf_macs(module: nnx.Module, out_shape: Shape) -> int:
    """Multiply-adds of one call of a :data:`LEAF_TYPES` layer producing ``out_shape``."""
    if isinstance(module, Conv):
        return conv_macs(out_shape, module.kernel_size, module.in_features)
    if isinstance(module, DepthwiseConv):
        return conv_macs(out_shape, module.kernel_size, 1)
    if isinstance(module, (PointwiseConv, nnx.Linear)):
        return math.prod(out_shape) * module.in_features
    if isinstance(module, SeparableConv):
        return separable_conv_macs(module, out_shape)
    if isinstance(module, (BatchNorm, Normalize, nnx.BatchNorm)):
        return math.prod(out_shape)
    if isinstance(module, nnx.Conv):
        kernel = module.kernel.get_value().shape  # (*k, in / groups, out)
        return conv_macs(out_shape, kernel[:-2], kernel[-2])
    raise TypeError(f"no multiply-add formula for {type(module).__name__}")


def separable_conv_macs(module: SeparableConv, out_shape: Shape) -> int:
    """depthwise + optional mid BatchNorm + pointwise + optional concat projection."""
    mid = module.depthwise.out_features
    mid_shape = (*out_shape[:-1], mid)
    macs = conv_macs(mid_shape, module.kernel_size, 1)
    if module.norm is not None:
        macs += math.prod(mid_shape)
    macs += math.prod(out_shape) * mid
    if module.project is not None:
        macs += math.prod(out_shape) * (mid + module.out_features)
    return macs


def regular_conv_cost(
    in_features: int, out_features: int, kernel_size: Sequence[int], out_shape: Shape,
    *, bias: bool, batch_norm: bool = False,
) -> tuple[int, int]:
    """(params, MACs) of the dense conv mapping the same input to ``out_shape`` (+ a BatchNorm)."""
    params = math.prod(kernel_size) * in_features * out_features + (out_features if bias else 0)
    macs = conv_macs(out_shape, kernel_size, in_features)
    if batch_norm:
        params += 2 * out_features
        macs += math.prod(out_shape)
    return params, macs


def regular_equivalent(module: nnx.Module, out_shape: Shape) -> tuple[int, int] | None:
    """(params, MACs) of the regular counterpart of a separable module, None for others.

    ``SeparableConv`` -> a ``Conv`` with the same kernel, strides, dilation,
    padding and bias; ``SeparableBlock`` -> a ``ConvBlock`` (conv + BatchNorm).
    """
    if isinstance(module, SeparableConv):
        return regular_conv_cost(module.in_features, module.out_features, module.kernel_size,
                                 out_shape, bias=module.use_bias)
    if isinstance(module, SeparableBlock):
        return regular_conv_cost(module.in_features, module.out_features, module.kernel_size,
                                 out_shape, bias=False, batch_norm=True)
    return None


SEPARABLE_TYPES: tuple[type, ...] = (SeparableConv, SeparableBlock)
REGULAR_TYPES: tuple[type, ...] = (Conv, ConvBlock)
