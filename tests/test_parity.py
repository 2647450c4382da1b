"""Forward parity: every jaxdsc module against its PyTorch twin (torch_bridge.nn).

The twin gets the JAX module's weights through ``torch_bridge.to_torch`` and
the same input in NCHW; outputs are compared in float32 (``RTOL32``) and
float64 (``RTOL64``, under a scoped ``jax.enable_x64``), see conftest.py for
the tolerances' justification. Depthwise convs run with every registered
``impl`` and ``"auto"``; implementations whose ``supports()`` declines a call
are skipped for it. A grid covers every module, option and padding mode;
hypothesis sweeps kernel 1-7, dilation 1-4, stride 1-3, depth multiplier 1-3,
odd and even sizes down to 1, 1-D/2-D/3-D.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    IMPL_NAMES,
    RTOL32,
    RTOL64,
    assert_close,
    assert_parity,
    impl_supported,
    init_kwargs,
    jax_call,
    random_input,
    run_twins,
    skip_unsupported,
    to_nchw,
    torch_state,
    x64_enabled,
)
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdsc
import torch_bridge
from jaxdsc.activations import ACTIVATIONS
from jaxdsc.padding import PADDING_NAMES
from torch_bridge import nn as tnn

SWEEP = settings(max_examples=30, deadline=None, derandomize=True, database=None)
SWEEP64 = settings(max_examples=10, deadline=None, derandomize=True, database=None)

DTYPES = {"float32": (jnp.float32, np.float32, RTOL32), "float64": (jnp.float64, np.float64, RTOL64)}
SIZES = {1: [(11,), (8,)], 2: [(9, 8), (7, 10)], 3: [(6, 5, 7)]}
MODE_RANKS = [(m, r) for m in PADDING_NAMES for r in (1, 2, 3) if m != "CAUSAL" or r == 1]
# (kernel, stride, dilation, depth multiplier): strided+dilated, even kernel with wide dilation.
# (Plain stride-1/dilation-1 cases are in the sweeps.) float64 runs the first only: each case is
# one XLA compile per impl, the suite's main cost.
SPATIAL = [(3, 2, 2, 2), (2, 1, 3, 3)]


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)  # torch-initialised twins (see jax_twin) are deterministic


@pytest.fixture(params=sorted(DTYPES))
def dtype(request):
    """(param dtype, numpy dtype, tolerance); float64 runs inside a scoped x64 context."""
    if request.param == "float64":
        with x64_enabled():
            yield DTYPES["float64"]
    else:
        yield DTYPES["float32"]


def jax_twin(torch_module: torch.nn.Module, param_dtype: Any) -> nnx.Module:
    """The JAX module for a freshly initialised torch twin, in ``param_dtype``.

    Built through ``from_torch`` for the composites that take no ``kernel_init``:
    it allocates no ``jax.random`` state, whose per-shape compiles would otherwise
    dominate these tests. (JAX-side construction is covered in test_roundtrip.py.)
    """
    dtype = {jnp.float32: torch.float32, jnp.float64: torch.float64, jnp.bfloat16: torch.bfloat16}[param_dtype]
    return torch_bridge.from_torch(torch_module.to(dtype))


def randomize_batchnorms(module: nnx.Module, seed: int = 1) -> None:
    """Non-trivial scale/bias/running statistics, so eval mode is not the identity."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(module):
        if isinstance(m, jaxdsc.BatchNorm):
            c, dt = m.num_features, m.scale[...].dtype
            m.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), dt)
            m.bias[...] = jnp.asarray(rng.normal(size=c), dt)
            m.mean[...] = jnp.asarray(rng.normal(size=c), dt)
            m.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), dt)


def check_state_parity(module: nnx.Module, twin: torch.nn.Module, rtol: float) -> None:
    """After a train-mode call both hold the same running statistics and step counters."""
    ours, theirs = torch_bridge.torch_state_dict(module), torch_state(twin)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        if key.endswith("num_batches_tracked"):
            assert int(ours[key]) == int(theirs[key]) == 1, key
        else:
            assert_close(ours[key], theirs[key], rtol, what=key)


# ---------------------------------------------------------------- depthwise: grid
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize(("mode", "rank"), MODE_RANKS)
def test_depthwise_every_padding_mode(mode, rank, impl, dtype):
    pdt, npdt, rtol = dtype
    ran = 0
    cases = SPATIAL if npdt == np.float32 else SPATIAL[:1]
    for i, (k, s, d, m) in enumerate(cases):
        size = SIZES[rank][i % len(SIZES[rank])]  # odd and even sizes
        conv = jaxdsc.DepthwiseConv(3, (k,) * rank, depth_multiplier=m, strides=s, kernel_dilation=d,
                                    padding=mode, param_dtype=pdt, impl=impl, **init_kwargs(k + s))
        x = random_input((2, *size, 3), npdt, seed=i)
        if impl_supported(impl, conv, x):
            assert_parity(conv, x, rtol)
            ran += 1
    if not ran:
        pytest.skip(f"impl={impl!r} supports none of these calls")


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize(
    ("padding", "rank"),
    [(0, 2), (2, 2), (((0, 3), (2, 1)), 2), ((1, (0, 2)), 2), (((4, 0),), 1), (((1, 2), 0, (2, 0)), 3),
     ("same_lower", 2), ("causal", 1)],
)
def test_depthwise_explicit_padding(padding, rank, impl):
    pdt, npdt, rtol = jnp.float32, np.float32, RTOL32
    conv = jaxdsc.DepthwiseConv(2, (3,) * rank, depth_multiplier=2, strides=2, kernel_dilation=2,
                                padding=padding, param_dtype=pdt, impl=impl, **init_kwargs(0))
    x = random_input((2, *SIZES[rank][0], 2), npdt)
    skip_unsupported(impl, conv, x)
    assert_parity(conv, x, rtol)


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_depthwise_without_bias_and_size_one(impl):
    pdt, npdt, rtol = jnp.float32, np.float32, RTOL32
    for rank in (1, 2, 3):
        conv = jaxdsc.DepthwiseConv(4, (3,) * rank, depth_multiplier=3, use_bias=False, padding="SAME",
                                    kernel_dilation=4, param_dtype=pdt, impl=impl, **init_kwargs(rank))
        x = random_input((1, *(1,) * rank, 4), npdt)  # every tap but the centre lands in padding
        if impl_supported(impl, conv, x):
            assert_parity(conv, x, rtol)


# ---------------------------------------------------------------- depthwise: sweep
def _spatial_case(draw: Any, rank: int) -> dict[str, Any]:
    k = tuple(draw(st.integers(1, 7)) for _ in range(rank))
    return dict(
        kernel_size=k,
        strides=tuple(draw(st.integers(1, 3)) for _ in range(rank)),
        kernel_dilation=tuple(draw(st.integers(1, 4)) for _ in range(rank)),
        size=tuple(draw(st.integers(1, 12 if rank < 3 else 7)) for _ in range(rank)),
        channels=draw(st.integers(1, 3)),
        batch=draw(st.integers(1, 2)),
    )


@st.composite
def conv_cases(draw: Any) -> dict[str, Any]:
    rank = draw(st.integers(1, 3))
    case = _spatial_case(draw, rank)
    names = [m for m in PADDING_NAMES if m != "CAUSAL" or rank == 1]
    case["padding"] = draw(st.one_of(
        st.sampled_from(names),
        st.integers(0, 4),
        st.tuples(*[st.tuples(st.integers(0, 4), st.integers(0, 4)) for _ in range(rank)]),
    ))
    case["depth_multiplier"] = draw(st.integers(1, 3))
    case["out"] = draw(st.integers(1, 4))
    case["seed"] = draw(st.integers(0, 2**16))
    return case


def _expect_same_error(jax_call, torch_call) -> bool:
    """Run both; if either raises, the other must raise the same ValueError. True if both ran."""
    try:
        jax_call()
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            torch_call()
        return False
    return True


def _depthwise_sweep(case: dict[str, Any], pdt: Any, npdt: Any, rtol: float) -> None:
    x = random_input((case["batch"], *case["size"], case["channels"]), npdt, seed=case["seed"])

    conv = jaxdsc.DepthwiseConv(
        case["channels"], case["kernel_size"], depth_multiplier=case["depth_multiplier"],
        strides=case["strides"], kernel_dilation=case["kernel_dilation"], padding=case["padding"],
        param_dtype=pdt, impl="auto", **init_kwargs(case["seed"]),
    )
    twin = torch_bridge.to_torch(conv)
    if not _expect_same_error(lambda: jax_call(conv, x), lambda: twin(torch.from_numpy(to_nchw(x)))):
        return  # input too small for this kernel/padding: both refused alike
    for impl in IMPL_NAMES:
        conv.impl = impl  # same weights, another implementation
        if impl_supported(impl, conv, x):
            assert_parity(conv, x, rtol)


@SWEEP
@given(conv_cases())
def test_depthwise_sweep(case):
    _depthwise_sweep(case, jnp.float32, np.float32, RTOL32)


@SWEEP64
@given(conv_cases())
def test_depthwise_sweep_float64(case):
    with x64_enabled():
        _depthwise_sweep(case, jnp.float64, np.float64, RTOL64)


def _conv_sweep(case: dict[str, Any], pdt: Any, npdt: Any, rtol: float) -> None:
    conv = jaxdsc.Conv(case["channels"], case["out"], case["kernel_size"], strides=case["strides"],
                       kernel_dilation=case["kernel_dilation"], padding=case["padding"],
                       param_dtype=pdt, **init_kwargs(case["seed"]))
    x = random_input((case["batch"], *case["size"], case["channels"]), npdt, seed=case["seed"])
    twin = torch_bridge.to_torch(conv)
    if _expect_same_error(lambda: jax_call(conv, x), lambda: twin(torch.from_numpy(to_nchw(x)))):
        assert_parity(conv, x, rtol)


@SWEEP
@given(conv_cases())
def test_conv_sweep(case):
    _conv_sweep(case, jnp.float32, np.float32, RTOL32)


@SWEEP64
@given(conv_cases())
def test_conv_sweep_float64(case):
    with x64_enabled():
        _conv_sweep(case, jnp.float64, np.float64, RTOL64)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(conv_cases(), st.sampled_from([None, "batch"]), st.sampled_from([None, "relu", "gelu", "silu"]),
       st.sampled_from([None, "concat"]), st.booleans(), st.sampled_from(IMPL_NAMES))
def test_separable_sweep(case, mid_norm, mid_activation, merge, use_bias, impl):
    conv = jaxdsc.SeparableConv(
        case["channels"], case["out"], case["kernel_size"], strides=case["strides"],
        kernel_dilation=case["kernel_dilation"], padding=case["padding"],
        depth_multiplier=case["depth_multiplier"], mid_norm=mid_norm, mid_activation=mid_activation,
        merge=merge, use_bias=use_bias, impl=impl, **init_kwargs(case["seed"]),
    )
    x = random_input((case["batch"], *case["size"], case["channels"]), np.float32, seed=case["seed"])
    twin = torch_bridge.to_torch(conv)
    if mid_norm:  # train-mode BatchNorm needs > 1 value per channel; compare eval mode instead
        conv.eval()
        twin.eval()
    if not _expect_same_error(lambda: jax_call(conv, x), lambda: twin(torch.from_numpy(to_nchw(x)))):
        return
    if impl_supported(impl, conv.depthwise, x):
        assert_parity(conv, x, RTOL32)


# ---------------------------------------------------------------- the other modules: grid
@pytest.mark.parametrize(("mode", "rank"), MODE_RANKS)
def test_conv_every_padding_mode(mode, rank, dtype):
    pdt, npdt, rtol = dtype
    for i, (k, s, d, _) in enumerate(SPATIAL if npdt == np.float32 else SPATIAL[:1]):
        conv = jaxdsc.Conv(3, 4, (k,) * rank, strides=s, kernel_dilation=d, padding=mode,
                           param_dtype=pdt, **init_kwargs(i))
        assert_parity(conv, random_input((2, *SIZES[rank][i % len(SIZES[rank])], 3), npdt, seed=i), rtol)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("use_bias", [True, False])
def test_pointwise(rank, use_bias, dtype):
    pdt, npdt, rtol = dtype
    conv = jaxdsc.PointwiseConv(5, 7, num_spatial_dims=rank, use_bias=use_bias, param_dtype=pdt,
                                **init_kwargs(0))
    assert_parity(conv, random_input((2, *SIZES[rank][0], 5), npdt), rtol)


SEPARABLE_OPTIONS = [
    {},
    {"use_bias": False},
    {"mid_norm": "batch"},
    {"merge": "concat"},
    {"merge": "concat", "use_bias": False},
    {"mid_norm": "batch", "mid_activation": "relu6", "merge": "concat"},
    *({"mid_activation": a} for a in sorted(ACTIVATIONS)),
]


SEPARABLE_CASES = [
    *((o, True) for o in SEPARABLE_OPTIONS),
    *((o, False) for o in SEPARABLE_OPTIONS if "mid_norm" in o),  # eval only differs with a mid norm
]


def _case_id(case: tuple[dict[str, Any], bool]) -> str:
    options, train = case
    return ("-".join(f"{k}={v}" for k, v in options.items()) or "plain") + ("-train" if train else "-eval")


@pytest.mark.parametrize("case", SEPARABLE_CASES, ids=_case_id)
def test_separable_conv_options(case, dtype):
    _separable(*case, "auto", dtype)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("case", [SEPARABLE_CASES[0], SEPARABLE_CASES[-1]], ids=_case_id)
def test_separable_conv_impls(case, impl):
    """Every depthwise implementation inside the composite (the option grid uses "auto")."""
    _separable(*case, impl, DTYPES["float32"])


def _separable(options: dict[str, Any], train: bool, impl: str, dtype: tuple[Any, Any, float]) -> None:
    pdt, npdt, rtol = dtype
    conv = jaxdsc.SeparableConv(3, 5, 3, strides=2, kernel_dilation=2, padding="REFLECT",
                                depth_multiplier=2, param_dtype=pdt, impl=impl, **init_kwargs(0), **options)
    randomize_batchnorms(conv)
    conv.train() if train else conv.eval()
    x = random_input((2, 9, 8, 3), npdt)
    skip_unsupported(impl, conv.depthwise, x)
    yj, yt, twin = run_twins(conv, x)
    assert twin.training is train
    assert_close(yj, yt, rtol)
    if train and "mid_norm" in options:
        check_state_parity(conv, twin, rtol)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_separable_conv_ranks(rank, dtype):
    pdt, npdt, rtol = dtype
    conv = jaxdsc.SeparableConv(3, 4, (3,) * rank, kernel_dilation=2, mid_norm="batch", mid_activation="gelu",
                                merge="concat", padding="CIRCULAR", param_dtype=pdt, **init_kwargs(0))
    assert_parity(conv, random_input((2, *SIZES[rank][0], 3), npdt), rtol)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("rank", "options"),
    [
        (2, {"residual": True}),
        (2, {"residual": True, "dilation": 3, "padding": "REPLICATE", "activation": "silu"}),
        (2, {"out_features": 6, "stride": 2, "depth_multiplier": 2, "padding": "SYMMETRIC"}),
        (1, {"residual": True, "padding": "CAUSAL", "dilation": 2}),
        (3, {"out_features": 2, "activation": None, "padding": "SAME_LOWER", "stride": 2}),
        (2, {"residual": True, "se_ratio": 0.25, "dilation": 2}),
        (1, {"out_features": 6, "se_ratio": 0.5, "depth_multiplier": 2, "padding": "CAUSAL"}),
    ],
)
def test_separable_block(rank, options, train, dtype):
    pdt, npdt, rtol = dtype
    options = dict(options)
    out = options.pop("out_features", 4)
    block = jax_twin(tnn.SeparableBlock(4, out, (3,) * rank, **options), pdt)
    randomize_batchnorms(block)
    block.train() if train else block.eval()
    yj, yt, twin = run_twins(block, random_input((3, *SIZES[rank][0], 4), npdt))
    assert twin.training is train
    assert_close(yj, yt, rtol)
    if train:
        check_state_parity(block, twin, rtol)


@pytest.mark.parametrize(("rank", "activation", "gate"), [(2, "relu", "sigmoid"), (1, "silu", "sigmoid"),
                                                        (3, "relu", "tanh"), (2, "hard_swish", "hard_sigmoid")])
def test_squeeze_excite(rank, activation, gate, dtype):
    pdt, npdt, rtol = dtype
    se = jaxdsc.SqueezeExcite(6, 3, activation=activation, gate=gate, num_spatial_dims=rank, param_dtype=pdt,
                              rngs=nnx.Rngs(0))
    # Shifted input: gates of a non-zero mean, not of zero.
    assert_parity(se, random_input((2, *SIZES[rank][0], 6), npdt) + 0.5, rtol)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("rank", "activation", "padding"), [(2, "relu", "SAME"), (1, "elu", "CAUSAL"),
                                                             (3, None, "VALID"), (2, "gelu_tanh", "REFLECT")])
def test_conv_block(rank, activation, padding, train, dtype):
    pdt, npdt, rtol = dtype
    block = jax_twin(tnn.ConvBlock(3, 5, (3,) * rank, stride=2, dilation=2, activation=activation,
                                   padding=padding), pdt)
    randomize_batchnorms(block)
    block.train() if train else block.eval()
    yj, yt, twin = run_twins(block, random_input((2, *SIZES[rank][0], 3), npdt))
    assert_close(yj, yt, rtol)
    if train:
        check_state_parity(block, twin, rtol)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6), (2, 5, 4, 6), (2, 3, 4, 2, 6)], ids=lambda s: f"{len(s)}d")
def test_batchnorm(shape, train, dtype):
    pdt, npdt, rtol = dtype
    bn = jaxdsc.BatchNorm(6, momentum=0.8, epsilon=1e-3, param_dtype=pdt)
    randomize_batchnorms(bn)
    bn.train() if train else bn.eval()
    x = random_input(shape, npdt) * 3 + 1
    yj, yt, twin = run_twins(bn, x)
    assert twin.momentum == pytest.approx(0.2) and twin.eps == 1e-3
    assert_close(yj, yt, rtol)
    if train:
        check_state_parity(bn, twin, rtol)


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 6, 3), (2, 3, 4, 2, 3)])
def test_normalize(shape, dtype):
    pdt, npdt, rtol = dtype
    norm = jaxdsc.Normalize(3, [0.1, -0.2, 0.3], [0.5, 2.0, 0.7], param_dtype=pdt)
    assert_parity(norm, random_input(shape, npdt), rtol)


STAGES_8X8 = {"widths": (4, 8, 12), "strides": (1, 2, 2), "dilations": (1, 2)}  # the cifar10-cpu layout


@pytest.mark.parametrize(
    ("in_features", "depth", "activation", "train", "dtype_name", "stages"),
    [(3, 1, "relu", True, "float32", {}), (3, 1, "relu", False, "float32", {}), (1, 2, "silu", True, "float32", {}),
     (3, 1, "relu", True, "float64", {}), (3, 1, "relu", False, "float64", {}),
     (3, 2, "relu", True, "float32", STAGES_8X8), (3, 3, "relu", False, "float64", STAGES_8X8),
     (3, 2, "relu", True, "float32", {**STAGES_8X8, "kernel_size": 5}),
     (3, (1, 3, 2), "relu", True, "float32", {**STAGES_8X8, "stem_width": 6}),
     (3, 2, "relu", True, "float32", {**STAGES_8X8, "se_ratio": 0.25}),
     (3, 1, "relu", False, "float64", {**STAGES_8X8, "se_ratio": 0.5})],
)
def test_dscnet(in_features, depth, activation, train, dtype_name, stages):
    with x64_enabled() if dtype_name == "float64" else contextlib.nullcontext():
        _dscnet(in_features, depth, activation, train, DTYPES[dtype_name], stages)


def _dscnet(in_features: int, depth: int | tuple[int, int, int], activation: str, train: bool, dtype: tuple[Any, Any, float],
            stages: dict[str, Any]) -> None:
    pdt, npdt, rtol = dtype
    arch = stages or {"width": 4}
    net = jax_twin(tnn.DSCNet(num_classes=5, in_channels=in_features, depth=depth, activation=activation, **arch),
                   pdt)
    randomize_batchnorms(net)
    net.train() if train else net.eval()
    x = np.random.default_rng(0).random((3, 12, 10, in_features)).astype(npdt)
    yj, yt, twin = run_twins(net, x)
    assert yj.shape == (3, 5) and yj.dtype == yt.dtype == npdt
    assert_close(yj, yt, rtol)
    if train:
        check_state_parity(net, twin, rtol)


def test_dscnet_bfloat16_runs_in_both_frameworks():
    """A bf16 model: both run (the head promotes to float32 features) and agree to bf16 precision."""
    net = jax_twin(tnn.DSCNet(width=4, depth=1), jnp.bfloat16)
    net.eval()
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    twin = torch_bridge.to_torch(net)
    yj = np.asarray(jax_call(net, x))
    with torch.no_grad():
        yt = twin(torch.from_numpy(to_nchw(x)).bfloat16())
    assert yj.dtype == np.float32 and yt.dtype == torch.float32
    # bf16 has 8 mantissa bits (unit roundoff 4e-3); the JAX model sees float32 input
    # and promotes where torch stays in bf16, so allow a few bf16 ulps of the logits' scale.
    assert_close(yj, yt.numpy(), 5e-2)
