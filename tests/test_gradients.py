"""Gradient parity: ``jax.grad`` of every module family against torch autograd.

The loss is ``sum(y * c)`` for a fixed random cotangent ``c``, so every output
element contributes with its own weight. Compared: the input gradient and
every parameter gradient (mapped to torch names and layouts by the same
conversion table as the weights; the layouts are transposes/reshapes, which
commute with differentiation). BatchNorm modules are differentiated in train
mode (batch statistics, the hard case) and in eval mode.

Tolerances: as the forward tests (conftest.py), relative to ``max |grad|``.
Weight gradients are sums over all ``N * spatial`` positions, in different
orders in XLA and PyTorch; float32 errors stay at a few 1e-7 relative, well
inside ``RTOL32``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    IMPL_NAMES,
    RTOL32,
    RTOL64,
    assert_close,
    impl_supported,
    init_kwargs,
    random_input,
    to_nchw,
    to_nhwc,
    x64_enabled,
)
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdsc
import torch_bridge
from torch_bridge import nn as tnn

DTYPES = {"float32": (jnp.float32, np.float32, RTOL32), "float64": (jnp.float64, np.float64, RTOL64)}


@pytest.fixture(params=sorted(DTYPES))
def dtype(request):
    if request.param == "float64":
        with x64_enabled():
            yield DTYPES["float64"]
    else:
        yield DTYPES["float32"]


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


def jax_grads(module: nnx.Module, x: np.ndarray, cot: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(d loss / d x, {torch parameter name: d loss / d parameter in torch layout})."""
    def loss(m: nnx.Module, v: jax.Array) -> jax.Array:
        return jnp.sum(m(v) * cot)

    # nnx.grad differentiates w.r.t. the module's nnx.Param leaves (and propagates the
    # train-mode statistics update back to the module, harmlessly: its twin exists already).
    gp, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(module, jnp.asarray(x))
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    as_module = nnx.merge(graphdef, gp, rest)  # gradients in the module's own structure
    return np.asarray(gx), torch_bridge.torch_state_dict(as_module)


def torch_grads(twin: torch.nn.Module, x: np.ndarray, cot: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    xt = torch.from_numpy(to_nchw(x) if x.ndim > 2 else x.copy()).requires_grad_(True)
    y = twin(xt)
    c = torch.from_numpy(to_nchw(cot) if cot.ndim > 2 else cot)
    (y * c).sum().backward()
    gx = xt.grad.numpy()
    grads = {name: torch_bridge.convert.tensor_to_numpy(p.grad) for name, p in twin.named_parameters()}
    return (to_nhwc(gx) if gx.ndim > 2 else gx), grads


def check_grads(module: nnx.Module, x: np.ndarray, rtol: float) -> dict[str, float]:
    """Compare all gradients; returns the relative errors (for reporting)."""
    twin = torch_bridge.to_torch(module)  # before any JAX call: same statistics in train mode
    y_shape = nnx.eval_shape(lambda m, v: m(v), module, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
    cot = random_input(y_shape, x.dtype, seed=7)
    gx, gp = jax_grads(module, x, cot)
    tx, tp = torch_grads(twin, x, cot)
    errors = {"x": assert_close(gx, tx, rtol, what="input gradient")}
    assert tp, "module has no parameters?"
    for name, g in tp.items():
        errors[name] = assert_close(gp[name], g, rtol, what=f"gradient of {name}")
    return errors


def jax_twin(torch_module: torch.nn.Module, param_dtype: Any) -> nnx.Module:
    dtype = {jnp.float32: torch.float32, jnp.float64: torch.float64}[param_dtype]
    return torch_bridge.from_torch(torch_module.to(dtype))


# ---------------------------------------------------------------- convolutions
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize(
    ("padding", "rank", "k", "s", "d", "m"),
    [
        ("SAME", 2, 3, 1, 2, 1),
        ("REFLECT", 2, 2, 2, 3, 2),
        ("CIRCULAR", 1, 5, 1, 2, 3),
        ("CAUSAL", 1, 3, 2, 2, 1),
        ("SAME_LOWER", 3, 2, 2, 2, 2),
        (((0, 3), (2, 0)), 2, 4, 3, 1, 1),
    ],
)
def test_depthwise(padding, rank, k, s, d, m, impl, dtype):
    pdt, npdt, rtol = dtype
    conv = jaxdsc.DepthwiseConv(3, (k,) * rank, depth_multiplier=m, strides=s, kernel_dilation=d,
                                padding=padding, impl=impl, param_dtype=pdt, **init_kwargs(1))
    x = random_input((2, *(9, 8, 7)[:rank], 3), npdt)
    if not impl_supported(impl, conv, x):
        pytest.skip(f"impl={impl!r} does not support this call")
    check_grads(conv, x, rtol)


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(
    rank=st.integers(1, 3), k=st.integers(1, 5), s=st.integers(1, 3), d=st.integers(1, 3),
    m=st.integers(1, 3), n=st.integers(1, 9),
    padding=st.sampled_from(["SAME", "VALID", "REFLECT", "CIRCULAR", "SYMMETRIC", "SAME_LOWER", 1]),
)
def test_depthwise_sweep(rank, k, s, d, m, n, padding):
    conv = jaxdsc.DepthwiseConv(2, (k,) * rank, depth_multiplier=m, strides=s, kernel_dilation=d,
                                padding=padding, **init_kwargs(n))
    x = random_input((2, *(n,) * rank, 2), np.float32, seed=n)
    try:  # resolve the padding exactly as both frameworks' modules do
        jaxdsc.padding.resolve_padding(conv.padding, x.shape[1:-1], conv.kernel_size, conv.strides,
                                       conv.kernel_dilation)
    except ValueError:
        return  # input too small for this kernel (both frameworks refuse; see test_parity)
    for impl in IMPL_NAMES:
        conv.impl = impl
        if impl_supported(impl, conv, x):
            check_grads(conv, x, RTOL32)


@pytest.mark.parametrize(("padding", "rank"), [("SAME", 2), ("REFLECT", 1), ("CIRCULAR", 3), ("VALID", 2)])
def test_conv(padding, rank, dtype):
    pdt, npdt, rtol = dtype
    conv = jaxdsc.Conv(3, 4, (3,) * rank, strides=2, kernel_dilation=2, padding=padding, param_dtype=pdt,
                       **init_kwargs(2))
    check_grads(conv, random_input((2, *(9, 8, 7)[:rank], 3), npdt), rtol)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_pointwise(rank, dtype):
    pdt, npdt, rtol = dtype
    conv = jaxdsc.PointwiseConv(3, 5, num_spatial_dims=rank, param_dtype=pdt, **init_kwargs(3))
    check_grads(conv, random_input((2, *(5, 4, 3)[:rank], 3), npdt), rtol)


SEPARABLE_OPTIONS = {
    "plain": {},
    "norm-gelu": {"mid_norm": "batch", "mid_activation": "gelu"},
    "concat-silu": {"merge": "concat", "mid_activation": "silu"},
    "all": {"mid_norm": "batch", "mid_activation": "tanh", "merge": "concat", "use_bias": False},
}


@pytest.mark.parametrize(
    ("options", "impl"),
    [*((o, "auto") for o in SEPARABLE_OPTIONS), *(("all", i) for i in IMPL_NAMES if i != "auto")],
)
def test_separable_conv(options, impl, dtype):
    options = SEPARABLE_OPTIONS[options]
    pdt, npdt, rtol = dtype
    conv = jaxdsc.SeparableConv(3, 4, 3, strides=2, kernel_dilation=2, depth_multiplier=2, padding="REFLECT",
                                impl=impl, param_dtype=pdt, **init_kwargs(4), **options)
    x = random_input((2, 9, 8, 3), npdt)
    if not impl_supported(impl, conv.depthwise, x):
        pytest.skip(f"impl={impl!r} does not support this call")
    check_grads(conv, x, rtol)


# ---------------------------------------------------------------- normalisation and blocks
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 5, 6, 4), (2, 3, 4, 2, 4)], ids=["0d", "2d", "3d"])
def test_batchnorm(shape, train, dtype):
    pdt, npdt, rtol = dtype
    bn = jaxdsc.BatchNorm(4, param_dtype=pdt)
    bn.scale[...] = jnp.asarray([0.5, 1.0, 1.5, 2.0], pdt)
    bn.bias[...] = jnp.asarray([0.1, -0.2, 0.3, 0.0], pdt)
    bn.mean[...] = jnp.asarray([0.2, 0.1, -0.3, 0.0], pdt)
    bn.var[...] = jnp.asarray([1.5, 0.5, 2.0, 1.0], pdt)
    bn.train() if train else bn.eval()
    check_grads(bn, random_input(shape, npdt) * 2 + 1, rtol)


def test_normalize_input_gradient(dtype):
    pdt, npdt, rtol = dtype
    norm = jaxdsc.Normalize(3, [0.1, 0.2, 0.3], [0.5, 2.0, 0.25], param_dtype=pdt)
    twin = torch_bridge.to_torch(norm)
    x = random_input((2, 4, 5, 3), npdt)
    cot = random_input(x.shape, npdt, seed=7)
    gx = jax.grad(lambda v: jnp.sum(norm(v) * cot))(jnp.asarray(x))
    xt = torch.from_numpy(to_nchw(x)).requires_grad_(True)
    (twin(xt) * torch.from_numpy(to_nchw(cot))).sum().backward()
    assert_close(gx, to_nhwc(xt.grad.numpy()), rtol)
    assert not list(twin.parameters())  # mean/std are buffers, never trained


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_separable_block(train, dtype):
    pdt, npdt, rtol = dtype
    block = jax_twin(tnn.SeparableBlock(4, 4, 3, dilation=2, depth_multiplier=2, residual=True,
                                        activation="silu"), pdt)
    block.train() if train else block.eval()
    check_grads(block, random_input((2, 7, 6, 4), npdt), rtol)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_conv_block(train, dtype):
    pdt, npdt, rtol = dtype
    block = jax_twin(tnn.ConvBlock(3, 4, 3, stride=2, padding="SYMMETRIC", activation="gelu"), pdt)
    block.train() if train else block.eval()
    check_grads(block, random_input((2, 7, 6, 3), npdt), rtol)


def test_dscnet(dtype):
    """With a smooth activation: behind ReLU, train-mode BatchNorm gradients can be near-zero
    sums of cancelling terms (float32 then differs by ~1e-3 of max|g| on one such parameter
    while float64 agrees to 1e-12 -- conditioning, not a formula difference)."""
    pdt, npdt, rtol = dtype
    net = jax_twin(tnn.DSCNet(num_classes=3, width=4, depth=1, activation="silu"), pdt)
    x = np.random.default_rng(0).random((4, 8, 8, 3)).astype(npdt)
    check_grads(net, x, rtol)
