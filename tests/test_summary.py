"""jaxdsc.summary: counts against XLA's cost analysis and PyTorch's FLOP counter.

XLA (``compiled.cost_analysis()["flops"]``) counts 2 flops per multiply-add
and skips kernel taps that fall on zero padding, so each XLA check computes
the padded taps independently (a plain loop over output positions and taps)
and asserts ``flops == 2 * (MACs - padded-tap MACs)`` exactly (integers, no
tolerance). With reflect padding the input is padded first, so every tap
counts. PyTorch's ``FlopCounterMode`` counts conv / linear multiply-adds, taps
over padding included, as 2 flops each and does not count BatchNorm, so its
total must equal ``2 * (total MACs - BatchNorm/Normalize MACs)`` exactly.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from conftest import random_input, torch_input
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

import jaxdsc
import torch_bridge
from jaxdsc.padding import resolve_padding
from jaxdsc.summary import __main__ as cli
from torch_bridge import nn as tnn

AFFINE = ("BatchNorm", "Normalize")


def xla_flops(module: nnx.Module, shape: tuple[int, ...]) -> float:
    graphdef, state = nnx.split(module)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def padded_fraction(spatial, kernel, strides, dilation, padding) -> tuple[int, int]:
    """(taps on real input, all taps) over every output position, by enumeration."""
    pad = resolve_padding(padding, spatial, kernel, strides, dilation)
    valid = total = 1
    for n, k, s, d, (lo, hi) in zip(spatial, kernel, strides, dilation, pad.pairs, strict=True):
        out = (n + lo + hi - d * (k - 1) - 1) // s + 1
        taps = [(o * s - lo + t * d) for o in range(out) for t in range(k)]
        inside = n if pad.mode == "constant" else n + lo + hi  # filled modes pad before the conv
        offset = 0 if pad.mode == "constant" else lo
        valid *= sum(0 <= p + offset < inside for p in taps)
        total *= len(taps)
    return valid, total


def _kw(impl=True):
    return dict(use_bias=False, rngs=nnx.Rngs(0), **({"impl": "xla"} if impl else {}))


CONV_CASES = [
    # (module factory, input shape); every conv on XLA's own path, no bias.
    (lambda: jaxdsc.Conv(5, 7, 3, **_kw()), (2, 9, 11, 5)),
    (lambda: jaxdsc.Conv(5, 7, 3, strides=2, kernel_dilation=2, padding="VALID", **_kw()), (2, 13, 12, 5)),
    (lambda: jaxdsc.Conv(4, 6, (3, 5), strides=(1, 2), kernel_dilation=(3, 1),
                         padding=((2, 1), (0, 3)), **_kw()), (1, 10, 9, 4)),
    (lambda: jaxdsc.Conv(3, 4, 3, padding="REFLECT", kernel_dilation=2, **_kw()), (1, 8, 7, 3)),
    (lambda: jaxdsc.DepthwiseConv(6, 3, depth_multiplier=2, **_kw()), (2, 9, 11, 6)),
    (lambda: jaxdsc.DepthwiseConv(6, 5, strides=2, kernel_dilation=2, padding="SYMMETRIC", **_kw()),
     (1, 15, 10, 6)),
    (lambda: jaxdsc.DepthwiseConv(4, 3, depth_multiplier=3, padding="VALID", strides=3, **_kw()),
     (2, 10, 10, 4)),
    (lambda: jaxdsc.DepthwiseConv(4, (3,), kernel_dilation=4, padding="CAUSAL", **_kw()), (2, 30, 4)),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_macs_match_xla(case):
    make, shape = CONV_CASES[case]
    m = nnx.eval_shape(make)  # abstract: no jax.random compile per parameter shape
    s = jaxdsc.summary(m, shape)
    (row,) = s.rows  # a lone layer is its own (root) row
    assert row.path == "" and row.leaf and row.macs == s.total_macs
    valid, total = padded_fraction(shape[1:-1], m.kernel_size, m.strides, m.kernel_dilation, m.padding)
    macs_real = s.total_macs * valid // total
    assert s.total_macs * valid % total == 0
    assert xla_flops(m, shape) == 2 * macs_real
    if m.padding == "VALID":
        assert xla_flops(m, shape) == 2 * s.total_macs


def test_pointwise_linear_separable_match_xla():
    shape = (2, 6, 7, 8)  # under the native GEMM's row threshold: XLA's dot everywhere
    for m in (nnx.eval_shape(lambda: jaxdsc.PointwiseConv(8, 12, use_bias=False, rngs=nnx.Rngs(0))),
              nnx.eval_shape(lambda: nnx.Linear(8, 5, use_bias=False, rngs=nnx.Rngs(0)))):
        assert xla_flops(m, shape) == 2 * jaxdsc.summary(m, shape).total_macs
    for merge in (None, "concat"):
        m = nnx.eval_shape(lambda merge=merge: jaxdsc.SeparableConv(
            8, 12, 3, depth_multiplier=2, padding="VALID", kernel_dilation=2, merge=merge, **_kw()))
        s = jaxdsc.summary(m, shape)
        dw = 2 * 2 * 3 * 8 * 2 * 9          # N * out H * out W * C*M * taps
        pw = 2 * 2 * 3 * 16 * 12
        proj = 2 * 2 * 3 * (16 + 12) * 12 if merge else 0
        assert s.total_macs == dw + pw + proj
        assert xla_flops(m, shape) == 2 * s.total_macs


class Pair(nnx.Module):
    """A depthwise + pointwise pair that is not a SeparableConv / SeparableBlock, plus a stray Param."""

    def __init__(self, rngs, stray=False):
        self.dw = jaxdsc.DepthwiseConv(4, 3, kernel_dilation=2, use_bias=False, rngs=rngs)
        self.bn = jaxdsc.BatchNorm(4)
        self.pw = jaxdsc.PointwiseConv(4, 6, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((6,))) if stray else None

    def __call__(self, x):
        y = self.pw(jax.nn.relu(self.bn(self.dw(x))))
        return y * self.scale[...] if self.scale is not None else y


def test_rows_and_regular_equivalents():
    m = nnx.eval_shape(lambda: nnx.Sequential(jaxdsc.SeparableBlock(8, 16, 3, strides=2, rngs=nnx.Rngs(0))))
    s = jaxdsc.summary(m, (1, 10, 10, 8))
    block, *parts = s.rows
    assert [r.path for r in parts] == ["layers.0.depthwise", "layers.0.bn_dw", "layers.0.pointwise",
                                       "layers.0.bn_pw"]
    assert block.output_shape == (1, 5, 5, 16) and not block.leaf and all(r.leaf for r in parts)
    assert block.macs == sum(r.macs for r in parts) == 25 * (8 * 9 + 8 + 8 * 16 + 16)
    assert block.params == sum(r.params for r in parts) == 8 * 9 + 16 + 8 * 16 + 32
    assert (block.regular_params, block.regular_macs) == (9 * 8 * 16 + 32, 25 * (9 * 8 * 16 + 16))
    assert s.regular_macs == block.regular_macs and s.total_params == block.params
    alone = jaxdsc.summary(m.layers[0], (1, 10, 10, 8))  # the block as the root: its parts inside it
    assert alone.rows[0].path == "" and alone.regular_macs == block.regular_macs

    s = jaxdsc.summary(nnx.eval_shape(lambda: Pair(nnx.Rngs(0))), (2, 6, 6, 4))
    pw = s.rows[-1]
    assert pw.type == "PointwiseConv" and pw.separable_macs == s.total_macs
    assert pw.regular_macs == 2 * 36 * 9 * 4 * 6 and pw.regular_params == 9 * 4 * 6 + 6
    assert "dw+pw pair" in str(s)

    s = jaxdsc.summary(nnx.eval_shape(lambda: Pair(nnx.Rngs(0), stray=True)), (2, 6, 6, 4))
    assert s.uncounted == ("",) and "<root>" in str(s)  # the model's own Param
    nested = jaxdsc.summary(nnx.eval_shape(lambda: nnx.Sequential(Pair(nnx.Rngs(0), stray=True))),
                            (2, 6, 6, 4))
    assert nested.uncounted == ("layers.0",) and nested.rows[0].macs is None
    assert "MACs not counted" in str(nested)


def test_model_untouched_and_classes_restored():
    model = torch_bridge.from_torch(tnn.DSCNet(width=8, depth=1))  # concrete, no jax.random
    model.train()
    before = jax.tree.map(lambda a: a.copy(), nnx.to_pure_dict(nnx.state(model)))
    call = jaxdsc.SeparableBlock.__call__
    s = jaxdsc.summary(model, (1, 16, 16, 3), train=True)
    assert s.total_params == sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    after = nnx.to_pure_dict(nnx.state(model))
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    assert jaxdsc.SeparableBlock.__call__ is call
    with pytest.raises(ValueError, match="channels"):
        jaxdsc.summary(model, (1, 16, 16, 4))
    assert jaxdsc.SeparableBlock.__call__ is call  # restored after an error too
    with pytest.raises(ValueError, match=r"input_shape\[1\]"):
        jaxdsc.summary(model, (1, 0, 16, 3))
    with pytest.raises(TypeError, match="input_shape"):
        jaxdsc.summary(model, "1,16,16,3")


def test_torch_flop_counter_on_twins():
    for twin, shape in (
        (tnn.DSCNet(width=8, depth=1), (2, 17, 15, 3)),
        (tnn.UNet(3, width=4, depth=2), (1, 13, 10, 3)),
        (tnn.SeparableConv(6, 8, 3, dilation=2, mid_norm="batch", merge="concat", padding="REFLECT"),
         (1, 9, 10, 6)),
    ):
        m = torch_bridge.from_torch(twin.eval())
        s = jaxdsc.summary(m, shape)
        with FlopCounterMode(display=False) as counter:
            twin(torch_input(random_input(shape)))
        affine = sum(r.macs for r in s.rows if r.type in AFFINE)
        if isinstance(m, jaxdsc.SeparableConv):
            affine = math.prod(shape[1:-1]) * 6  # the mid BatchNorm inside the layer
        assert counter.get_total_flops() == 2 * (s.total_macs - affine)


def test_cli(capsys):
    assert cli.main(["jaxdsc:dscnet", "--input", "1,32,32,3", "--kwargs", '{"width": 8}']) == 0
    text = capsys.readouterr().out
    assert "blocks.5.pointwise" in text and "Total MACs" in text and "separable saves" in text
    assert cli.main(["jaxdsc:dscnet", "--input", "1,32,32,3", "--depth", "0"]) == 0
    text = capsys.readouterr().out
    assert "blocks.5 " in text and "pointwise" not in text and "Total MACs" in text
    assert cli.main(["jaxdsc:unet", "--input", "1,33,31,3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][-1]["output_shape"] == [1, 33, 31, 2]
    assert cli.main(["jaxdsc:nope", "--input", "1,8,8,3"]) == 2
    assert "unknown model name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["jaxdsc:dscnet", "--input", "1,x"])
