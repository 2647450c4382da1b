"""Bad input, table-driven: the JAX module and its PyTorch twin refuse it alike.

Each row builds (or calls) the JAX module and the torch twin with the same
mistake; both must raise the same exception type (``ValueError`` or
``TypeError``, ``CheckpointError`` being a ``ValueError``) with a message that
names the argument and the value received. The argument names differ where
the frameworks spell them differently (``in_features`` / ``in_channels``,
``strides`` / ``stride``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxdsc
import torch_bridge
from jaxdsc.models import DSCNet
from torch_bridge import CheckpointError
from torch_bridge import nn as tnn

R = nnx.Rngs  # short: every JAX row needs rngs


class Row(NamedTuple):
    id: str
    jax: Callable[[], Any]
    torch: Callable[[], Any]
    error: type[Exception]
    jax_match: str
    torch_match: str | None = None  # None: same pattern as JAX


def x_jax(*shape: int, dtype: Any = jnp.float32) -> jnp.ndarray:
    return jnp.ones(shape, dtype)


def x_torch(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype)


def _dw(**kw: Any) -> jaxdsc.DepthwiseConv:
    return jaxdsc.DepthwiseConv(kw.pop("in_features", 3), kw.pop("kernel_size", 3), rngs=R(0), **kw)


def _tdw(**kw: Any) -> tnn.DepthwiseConv:
    return tnn.DepthwiseConv(kw.pop("in_channels", 3), kw.pop("kernel_size", 3), **kw)


def _mismatched_checkpoint_jax() -> None:
    small = torch_bridge.nn.SeparableConv(3, 4, 3)
    big = jaxdsc.SeparableConv(3, 8, 3, rngs=R(0))
    torch_bridge.convert.load_torch_state_dict(big, {k: v.detach().numpy() for k, v in small.state_dict().items()})


def _mismatched_checkpoint_torch() -> None:
    small = torch_bridge.nn.SeparableConv(3, 4, 3)
    big = torch_bridge.nn.SeparableConv(3, 8, 3)
    torch_bridge.convert.build_torch("SeparableConv", torch_bridge.convert.module_config(big)[1],
                                     {k: v.detach().numpy() for k, v in small.state_dict().items()})


ROWS: list[Row] = [
    # ---- sizes and tuples
    Row("in_channels-zero", lambda: _dw(in_features=0), lambda: _tdw(in_channels=0), ValueError,
        r"in_features must be >= 1, got 0", r"in_channels must be >= 1, got 0"),
    Row("depth-multiplier-negative", lambda: _dw(depth_multiplier=-2), lambda: _tdw(depth_multiplier=-2),
        ValueError, r"depth_multiplier must be >= 1, got -2"),
    Row("kernel-zero", lambda: _dw(kernel_size=0), lambda: _tdw(kernel_size=0), ValueError,
        r"kernel_size must be >= 1, got 0"),
    Row("kernel-entry-negative", lambda: _dw(kernel_size=(3, -1)), lambda: _tdw(kernel_size=(3, -1)), ValueError,
        r"kernel_size\[1\] must be >= 1, got -1"),
    Row("kernel-4d", lambda: _dw(kernel_size=(3, 3, 3, 3)), lambda: _tdw(kernel_size=(3, 3, 3, 3)), ValueError,
        r"kernel_size must have 1, 2 or 3 entries .*got \(3, 3, 3, 3\)"),
    Row("stride-wrong-length", lambda: _dw(kernel_size=(3, 3), strides=(1, 2, 1)),
        lambda: _tdw(kernel_size=(3, 3), stride=(1, 2, 1)), ValueError,
        r"strides must have 2 entries .*got 3: \(1, 2, 1\)", r"stride must have 2 entries .*got 3: \(1, 2, 1\)"),
    Row("dilation-zero", lambda: _dw(kernel_dilation=0), lambda: _tdw(dilation=0), ValueError,
        r"kernel_dilation must be >= 1, got 0", r"dilation must be >= 1, got 0"),
    Row("num-spatial-dims-4", lambda: jaxdsc.PointwiseConv(3, 4, num_spatial_dims=4, rngs=R(0)),
        lambda: tnn.PointwiseConv(3, 4, num_spatial_dims=4), ValueError, r"num_spatial_dims must be 1, 2 or 3, got 4"),
    Row("dscnet-width-zero", lambda: DSCNet(width=0, rngs=R(0)), lambda: tnn.DSCNet(width=0), ValueError,
        r"width must be >= 1, got 0"),
    # ---- wrong types (bool where int expected is the classic slip)
    Row("bool-in-channels", lambda: _dw(in_features=True), lambda: _tdw(in_channels=True), TypeError,
        r"in_features must be an int, got True \(bool\)", r"in_channels must be an int, got True \(bool\)"),
    Row("bool-kernel", lambda: _dw(kernel_size=True), lambda: _tdw(kernel_size=True), TypeError,
        r"kernel_size must be an int or a tuple of ints, got True"),
    Row("bool-stride-entry", lambda: _dw(strides=(1, False)), lambda: _tdw(stride=(1, False)), TypeError,
        r"strides\[1\] must be an int, got False \(bool\)", r"stride\[1\] must be an int, got False \(bool\)"),
    Row("float-kernel", lambda: _dw(kernel_size=3.0), lambda: _tdw(kernel_size=3.0), TypeError,
        r"kernel_size must be an int or a tuple of ints, got 3\.0"),
    Row("int-for-bool", lambda: _dw(use_bias=1), lambda: _tdw(bias=1), TypeError,
        r"use_bias must be a bool, got 1 \(int\)", r"bias must be a bool, got 1 \(int\)"),
    # ---- padding
    Row("padding-unknown", lambda: _dw(padding="FULL"), lambda: _tdw(padding="FULL"), ValueError,
        r"padding must be one of \[.*'SYMMETRIC'\], an int or \(lo, hi\) pairs, got 'FULL'"),
    Row("padding-negative", lambda: _dw(padding=-1), lambda: _tdw(padding=-1), ValueError,
        r"padding must be >= 0, got -1"),
    Row("padding-pair-negative", lambda: _dw(padding=((1, -1), 0)), lambda: _tdw(padding=((1, -1), 0)),
        ValueError, r"padding\[0\] must be non-negative, got \(1, -1\)"),
    Row("causal-on-2d", lambda: _dw(padding="CAUSAL"), lambda: _tdw(padding="CAUSAL"), ValueError,
        r"padding='CAUSAL' is only defined for 1-D convolutions, got a 2-D kernel"),
    # ---- options by name
    Row("activation-unknown", lambda: jaxdsc.SeparableBlock(3, 3, 3, activation="swish", rngs=R(0)),
        lambda: tnn.SeparableBlock(3, 3, 3, activation="swish"), ValueError,
        r"activation must be one of \[.*'silu'.*\] or None, got 'swish'"),
    Row("activation-callable", lambda: jaxdsc.ConvBlock(3, 3, 3, activation=torch.relu, rngs=R(0)),
        lambda: tnn.ConvBlock(3, 3, 3, activation=torch.relu), TypeError,
        r"activation must be an activation name.*got <built-in method relu"),
    Row("mid-activation-unknown", lambda: jaxdsc.SeparableConv(3, 4, 3, mid_activation="mish", rngs=R(0)),
        lambda: tnn.SeparableConv(3, 4, 3, mid_activation="mish"), ValueError,
        r"mid_activation must be one of .* got 'mish'"),
    Row("merge-unknown", lambda: jaxdsc.SeparableConv(3, 4, 3, merge="add", rngs=R(0)),
        lambda: tnn.SeparableConv(3, 4, 3, merge="add"), ValueError, r"merge must be one of \[None, 'concat'\], got 'add'"),
    Row("mid-norm-unknown", lambda: jaxdsc.SeparableConv(3, 4, 3, mid_norm="layer", rngs=R(0)),
        lambda: tnn.SeparableConv(3, 4, 3, mid_norm="layer"), ValueError,
        r"mid_norm must be one of \[None, 'batch'\], got 'layer'"),
    Row("se-ratio-out-of-range", lambda: jaxdsc.SeparableBlock(3, 3, 3, se_ratio=1.5, rngs=R(0)),
        lambda: tnn.SeparableBlock(3, 3, 3, se_ratio=1.5), ValueError, r"se_ratio must be in \[0\.0, 1\.0\], got 1\.5"),
    Row("se-gate-unknown", lambda: jaxdsc.SqueezeExcite(4, 2, gate="softmax", rngs=R(0)),
        lambda: tnn.SqueezeExcite(4, 2, gate="softmax"), ValueError, r"gate must be one of .* got 'softmax'"),
    Row("se-channels-at-call", lambda: jaxdsc.SqueezeExcite(4, 2, rngs=R(0))(x_jax(2, 5, 5, 3)),
        lambda: tnn.SqueezeExcite(4, 2)(x_torch(2, 3, 5, 5)), ValueError,
        r"x must have 4 channels on its last axis \(NHWC\)", r"x must have 4 channels on its second axis \(NCHW\)"),
    Row("momentum-out-of-range", lambda: jaxdsc.BatchNorm(3, momentum=1.5), lambda: tnn.BatchNorm(3, momentum=1.5),
        ValueError, r"momentum must be in \[0\.0, 1\.0\], got 1\.5"),
    Row("eps-zero", lambda: jaxdsc.BatchNorm(3, epsilon=0.0), lambda: tnn.BatchNorm(3, eps=0.0), ValueError,
        r"epsilon must be in \(0\.0, inf\], got 0\.0", r"eps must be in \(0\.0, inf\], got 0\.0"),
    Row("normalize-std-zero", lambda: jaxdsc.Normalize(3, std=[1.0, 0.0, 1.0]),
        lambda: tnn.Normalize(3, std=[1.0, 0.0, 1.0]), ValueError, r"std\[1\] must be in \(0\.0, inf\], got 0\.0"),
    Row("normalize-mean-length", lambda: jaxdsc.Normalize(3, mean=[0.5, 0.5]), lambda: tnn.Normalize(3, mean=[0.5, 0.5]),
        ValueError, r"mean .*must have num_features=3 entries, got 2"),
    # ---- residual
    Row("residual-channels", lambda: jaxdsc.SeparableBlock(3, 4, 3, residual=True, rngs=R(0)),
        lambda: tnn.SeparableBlock(3, 4, 3, residual=True), ValueError,
        r"residual=True needs in_features == out_features .*in_features=3, out_features=4",
        r"residual=True needs in_channels == out_channels .*in_channels=3, out_channels=4"),
    Row("residual-stride", lambda: jaxdsc.SeparableBlock(3, 3, 3, strides=2, residual=True, rngs=R(0)),
        lambda: tnn.SeparableBlock(3, 3, 3, stride=2, residual=True), ValueError,
        r"residual=True needs .*strides=\(2, 2\)", r"residual=True needs .*stride=\(2, 2\)"),
    Row("residual-shape-at-call", lambda: jaxdsc.SeparableBlock(3, 3, 3, padding="VALID", residual=True,
                                                                rngs=R(0))(x_jax(2, 6, 6, 3)),
        lambda: tnn.SeparableBlock(3, 3, 3, padding="VALID", residual=True)(x_torch(2, 3, 6, 6)), ValueError,
        r"residual=True needs the block to keep the input shape, got input \(2, 6, 6, 3\) and output \(2, 4, 4, 3\)",
        r"residual=True needs the block to keep the input shape, got input \(2, 3, 6, 6\) and output \(2, 3, 4, 4\)"),
    # ---- inputs
    Row("channels-mismatch", lambda: _dw()(x_jax(2, 8, 8, 5)), lambda: _tdw()(x_torch(2, 5, 8, 8)), ValueError,
        r"x must have 3 channels on its last axis \(NHWC\), got shape \(2, 8, 8, 5\)$",
        r"x must have 3 channels on its second axis \(NCHW\), got shape \(2, 5, 8, 8\)$"),
    Row("wrong-rank", lambda: _dw()(x_jax(8, 8, 3)), lambda: _tdw()(x_torch(3, 8, 8)), ValueError,
        r"x must have rank 4 \(NHWC\) for a 2-D layer, got shape \(8, 8, 3\)",
        r"x must have rank 4 \(NCHW\) for a 2-D layer, got shape \(3, 8, 8\)"),
    Row("wrong-rank-1d", lambda: jaxdsc.Conv(3, 4, (3,), rngs=R(0))(x_jax(2, 8, 8, 3)),
        lambda: tnn.Conv(3, 4, (3,))(x_torch(2, 3, 8, 8)), ValueError,
        r"x must have rank 3 \(NWC\) for a 1-D layer, got shape \(2, 8, 8, 3\)",
        r"x must have rank 3 \(NCW\) for a 1-D layer, got shape \(2, 3, 8, 8\)"),
    Row("transposed-layout", lambda: _dw()(x_jax(2, 3, 8, 8)), lambda: _tdw()(x_torch(2, 8, 8, 3)), ValueError,
        r"got shape \(2, 3, 8, 8\); it looks like NCHW input, this layer expects NHWC",
        r"got shape \(2, 8, 8, 3\); it looks like NHWC input, this layer expects NCHW"),
    # (The JAX DSCNet comes from its torch twin: no jax.random initialisation to compile.)
    Row("transposed-layout-model", lambda: torch_bridge.from_torch(tnn.DSCNet(width=2, depth=1))(x_jax(2, 3, 8, 8)),
        lambda: tnn.DSCNet(width=2, depth=1)(x_torch(2, 8, 8, 3)), ValueError,
        r"got shape \(2, 3, 8, 8\); it looks like channels-first \(NCHW\) input, this layer expects NHWC",
        r"got shape \(2, 8, 8, 3\); it looks like channels-last \(NHWC\) input, this layer expects NCHW"),
    Row("integer-input", lambda: _dw()(x_jax(2, 8, 8, 3, dtype=jnp.int32)),
        lambda: _tdw()(x_torch(2, 3, 8, 8, dtype=torch.int32)), TypeError,
        r"x must be a floating-point array, got dtype int32",
        r"x must be a floating-point tensor, got dtype torch\.int32"),
    Row("integer-input-batchnorm", lambda: jaxdsc.BatchNorm(3)(x_jax(4, 3, dtype=jnp.int32)),
        lambda: tnn.BatchNorm(3)(x_torch(4, 3, dtype=torch.int64)), TypeError,
        r"x must be a floating-point array, got dtype int32", r"x must be a floating-point tensor, got dtype torch\.int64"),
    Row("list-input", lambda: jaxdsc.PointwiseConv(3, 4, rngs=R(0))([[1.0, 2.0, 3.0]]),
        lambda: tnn.PointwiseConv(3, 4)([[1.0, 2.0, 3.0]]), TypeError,
        r"x must be a JAX or NumPy array, got list", r"x must be a torch\.Tensor, got list"),
    Row("empty-batch", lambda: _dw()(x_jax(0, 8, 8, 3)), lambda: _tdw()(x_torch(0, 3, 8, 8)), ValueError,
        r"x must have no empty dimension, got shape \(0, 8, 8, 3\)", r"x must have no empty dimension, got shape \(0, 3, 8, 8\)"),
    Row("output-size-zero", lambda: _dw(kernel_size=5, padding="VALID")(x_jax(1, 3, 8, 3)),
        lambda: _tdw(kernel_size=5, padding="VALID")(x_torch(1, 3, 3, 8)), ValueError,
        r"input spatial size \(3, 8\) is too small: dim 0 has size 3, padding \(0, 0\) and effective kernel size 5"),
    Row("output-size-negative-dilated", lambda: _dw(kernel_size=3, kernel_dilation=4, padding=1)(x_jax(1, 4, 4, 3)),
        lambda: _tdw(kernel_size=3, dilation=4, padding=1)(x_torch(1, 3, 4, 4)), ValueError,
        r"input spatial size \(4, 4\) is too small: dim 0 has size 4, padding \(1, 1\) and effective kernel size 9"),
    Row("reflect-too-wide", lambda: _dw(kernel_size=5, padding="REFLECT")(x_jax(1, 2, 8, 3)),
        lambda: _tdw(kernel_size=5, padding="REFLECT")(x_torch(1, 3, 2, 8)), ValueError,
        r"REFLECT padding \(2, 2\) must be smaller than the input size 2 in spatial dim 0"),
    Row("batchnorm-channels", lambda: jaxdsc.BatchNorm(3)(x_jax(4, 5)), lambda: tnn.BatchNorm(3)(x_torch(4, 5)),
        ValueError, r"x must have shape \(N, \.\.\., 3\) \(channels last\), got \(4, 5\)",
        r"x must have shape \(N, 3, \.\.\.\) \(channels first\), got \(4, 5\)"),
    Row("batchnorm-one-value", lambda: jaxdsc.BatchNorm(3)(x_jax(1, 3)), lambda: tnn.BatchNorm(3)(x_torch(1, 3)),
        ValueError, r"more than 1 value per channel.*, got input (shape \(1, 3\)|size torch\.Size\(\[1, 3\]\))"),
    # ---- checkpoints
    Row("mismatched-checkpoint", _mismatched_checkpoint_jax, _mismatched_checkpoint_torch, CheckpointError,
        r"tensor 'pointwise\.weight' has shape \(4, 3, 1, 1\), expected \(8, 3, 1, 1\)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_bad_input(row: Row, framework: str):
    call = row.jax if framework == "jax" else row.torch
    match = row.jax_match if framework == "jax" or row.torch_match is None else row.torch_match
    with pytest.raises(row.error, match=match) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError))  # CheckpointError is a ValueError


def test_table_is_large_enough_and_ids_unique():
    assert len(ROWS) >= 25
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_good_versions_of_the_rows_work():
    """The same calls without the mistake succeed, so each row fails for its one reason."""
    assert _dw()(x_jax(2, 8, 8, 3)).shape == (2, 8, 8, 3)
    assert _tdw()(x_torch(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    assert _dw(kernel_size=5, padding="VALID")(x_jax(1, 5, 8, 3)).shape == (1, 1, 4, 3)
    assert _dw(kernel_size=3, kernel_dilation=4, padding=1)(x_jax(1, 7, 7, 3)).shape == (1, 1, 1, 3)
    assert tnn.SeparableBlock(3, 3, 3, residual=True)(x_torch(2, 3, 6, 6)).shape == (2, 3, 6, 6)
    assert np.asarray(jaxdsc.BatchNorm(3)(x_jax(2, 3))).shape == (2, 3)
