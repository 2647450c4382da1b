"""Round trips: JAX -> torch -> JAX and torch -> JAX -> torch, in memory and through files.

Every parameter and buffer must come back bit for bit (dtype, shape, bytes),
BatchNorm running statistics and ``num_batches_tracked`` included (after a
few train steps, so they are not their initial values), and the config must
come back equal. Files go through ``torch_bridge.save`` / ``load`` in both
frameworks, and a plain PyTorch user can read them with
``safetensors.torch.load_file`` + ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import (
    assert_same_state,
    init_kwargs,
    jax_call,
    random_input,
    same_bits,
    to_nchw,
    torch_state,
    x64_enabled,
)
from flax import nnx

import jaxdsc
import torch_bridge
from jaxdsc.models import DSCNet
from torch_bridge import nn as tnn
from torch_bridge.convert import module_config

# name -> (JAX factory(param_dtype), input shape NHWC). Factories build on the JAX side,
# so the JAX constructors and initialisers are exercised too.
FAMILIES: dict[str, tuple[Callable[[Any], nnx.Module], tuple[int, ...]]] = {
    "DepthwiseConv": (lambda dt: jaxdsc.DepthwiseConv(3, 3, depth_multiplier=2, strides=2, kernel_dilation=2,
                                                      padding="REFLECT", param_dtype=dt, **init_kwargs(0)),
                      (2, 7, 6, 3)),
    "DepthwiseConv-1d-nobias": (lambda dt: jaxdsc.DepthwiseConv(3, (4,), padding="CAUSAL", use_bias=False,
                                                                param_dtype=dt, **init_kwargs(1)), (2, 9, 3)),
    "PointwiseConv-3d": (lambda dt: jaxdsc.PointwiseConv(3, 5, num_spatial_dims=3, param_dtype=dt, **init_kwargs(2)),
                         (2, 3, 4, 2, 3)),
    "Conv": (lambda dt: jaxdsc.Conv(3, 4, (3, 2), padding=((1, 0), (2, 1)), param_dtype=dt, **init_kwargs(3)),
             (2, 6, 5, 3)),
    "SeparableConv-all": (lambda dt: jaxdsc.SeparableConv(3, 4, 3, mid_norm="batch", mid_activation="gelu",
                                                          merge="concat", depth_multiplier=2, param_dtype=dt,
                                                          **init_kwargs(4)), (2, 6, 5, 3)),
    "SeparableConv-nobias": (lambda dt: jaxdsc.SeparableConv(3, 4, (3,), use_bias=False, padding=2,
                                                             param_dtype=dt, **init_kwargs(5)), (2, 9, 3)),
    "BatchNorm": (lambda dt: jaxdsc.BatchNorm(3, momentum=0.75, epsilon=1e-3, param_dtype=dt), (4, 5, 3)),
    "Normalize": (lambda dt: jaxdsc.Normalize(3, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], param_dtype=dt), (2, 4, 4, 3)),
    "SeparableBlock": (lambda dt: jaxdsc.SeparableBlock(4, 4, 3, kernel_dilation=2, residual=True, momentum=0.8,
                                                        activation="silu", param_dtype=dt, rngs=nnx.Rngs(6)),
                       (2, 6, 6, 4)),
    "SeparableBlock-se": (lambda dt: jaxdsc.SeparableBlock(4, 6, 3, strides=2, se_ratio=0.5, param_dtype=dt,
                                                           rngs=nnx.Rngs(12)), (2, 6, 6, 4)),
    "SqueezeExcite-1d": (lambda dt: jaxdsc.SqueezeExcite(4, 2, activation="silu", gate="tanh", num_spatial_dims=1,
                                                         param_dtype=dt, rngs=nnx.Rngs(13)), (2, 7, 4)),
    "ConvBlock": (lambda dt: jaxdsc.ConvBlock(3, 4, 3, strides=2, padding="SYMMETRIC", param_dtype=dt,
                                              rngs=nnx.Rngs(7)), (2, 6, 6, 3)),
    "DSCNet": (lambda dt: DSCNet(num_classes=3, width=4, depth=1, param_dtype=dt, rngs=nnx.Rngs(8)),
               (2, 8, 8, 3)),
    "DSCNet-8x8": (lambda dt: DSCNet(num_classes=3, widths=(4, 8, 12), strides=(1, 2, 2), dilations=(1, 2), depth=2,
                                     param_dtype=dt, rngs=nnx.Rngs(9)), (2, 16, 16, 3)),
    "DSCNet-k5": (lambda dt: DSCNet(num_classes=3, widths=(4, 8, 12), strides=(1, 2, 1), dilations=(2,), depth=1,
                                    kernel_size=5, param_dtype=dt, rngs=nnx.Rngs(10)), (2, 16, 16, 3)),
    "DSCNet-depths-stem": (lambda dt: DSCNet(num_classes=3, widths=(4, 8, 12), strides=(2, 2, 1),
                                             dilations=(2, 4), depth=(2, 1, 3), stem_width=3, param_dtype=dt,
                                             rngs=nnx.Rngs(11)), (2, 16, 16, 3)),
    "DSCNet-se": (lambda dt: DSCNet(num_classes=3, widths=(4, 8, 12), strides=(2, 2, 1), dilations=(2,), depth=1,
                                    se_ratio=0.25, param_dtype=dt, rngs=nnx.Rngs(14)), (2, 16, 16, 3)),
}


def abstract_then_filled(make: Callable[[Any], nnx.Module], dtype: Any, seed: int = 0) -> nnx.Module:
    """``make(dtype)`` through the JAX constructor under ``nnx.eval_shape``, then filled from NumPy.

    The constructor (and its ``param_dtype`` handling) runs as usual, without the
    per-shape compiles of ``jax.random`` initialisers in a new dtype (seconds per model).
    """
    module = nnx.eval_shape(lambda: make(dtype))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module)):
        value = var.get_value()
        if jnp.issubdtype(value.dtype, jnp.floating):
            filled = np.abs(rng.standard_normal(value.shape)) + 0.5  # > 0: valid variances and stds
        else:
            filled = np.zeros(value.shape)
        var.set_value(jnp.asarray(filled, value.dtype))
    return module


def train_steps(module: nnx.Module, shape: tuple[int, ...], steps: int = 3) -> None:
    """A few train-mode calls on different batches: BatchNorm statistics and counters move."""
    dtype = np.float32 if module_dtype(module) != jnp.float64 else np.float64
    for i in range(steps):
        jax_call(module, random_input(shape, dtype, seed=100 + i) * (i + 1) + i)


def module_dtype(module: nnx.Module) -> Any:
    floats = {v.dtype for v in jax_leaves(module) if jnp.issubdtype(v.dtype, jnp.floating)}
    return floats.pop() if len(floats) == 1 else jnp.float32


def jax_leaves(module: nnx.Module) -> list[Any]:
    return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(module))]


def check_counters(state: dict[str, np.ndarray], expected: int) -> None:
    counters = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert all(c == expected for c in counters.values()), counters


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> tuple[str, Callable[[Any], nnx.Module], tuple[int, ...]]:
    return (request.param, *FAMILIES[request.param])


# ---------------------------------------------------------------- in memory
def test_jax_torch_jax(family):
    _, make, shape = family
    module = make(jnp.float32)
    train_steps(module, shape)
    before = torch_bridge.torch_state_dict(module)
    if any(k.endswith("num_batches_tracked") for k in before):
        check_counters(before, 3)
    twin = torch_bridge.to_torch(module)
    assert_same_state(torch_state(twin), before)
    back = torch_bridge.from_torch(twin)
    assert type(back) is type(module)
    assert_same_state(torch_bridge.torch_state_dict(back), before)
    assert module_config(back) == module_config(module) == module_config(twin)
    # The JAX state itself (not just its torch view) is bit-identical, dtypes included.
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(module)), nnx.to_flat_state(nnx.state(back)),
                                strict=True):
        assert pa == pb and same_bits(np.asarray(a.get_value()), np.asarray(b.get_value())), pa
    # Same weights, same code: the same function bit for bit (eval mode: no state change).
    module.eval()
    back.eval()
    x = random_input(shape)
    assert same_bits(np.asarray(jax_call(module, x)), np.asarray(jax_call(back, x)))


def test_torch_jax_torch(family):
    _, make, shape = family
    torch.manual_seed(0)
    cls_name, config = module_config(make(jnp.float32))
    twin = torch_bridge.convert.abstract_torch(cls_name, config).to_empty(device="cpu")
    for i, t in enumerate(twin.state_dict().values()):  # arbitrary, distinct values
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).abs() + 0.1)
        else:
            t.fill_(0)
    twin.train()
    with torch.no_grad():
        for i in range(3):
            twin(torch.from_numpy(to_nchw(random_input(shape, seed=i))))
    before = torch_state(twin)
    back = torch_bridge.to_torch(torch_bridge.from_torch(twin))
    assert_same_state(torch_state(back), before)
    if any(k.endswith("num_batches_tracked") for k in before):
        check_counters(before, 3)
    assert back.training is True
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in twin.modules()):
        # Only BatchNorm has a train/eval state on the JAX side, so only then can eval survive.
        twin.eval()
        assert torch_bridge.to_torch(torch_bridge.from_torch(twin)).training is False


def test_eval_flag_and_options_carry_over():
    conv = jaxdsc.SeparableConv(3, 4, 3, mid_norm="batch", **init_kwargs(0))
    conv.eval()
    twin = torch_bridge.to_torch(conv)
    assert twin.training is False
    back = torch_bridge.from_torch(twin, impl="xla")
    assert back.depthwise.impl == "xla" and back.norm.use_running_average is True


# ---------------------------------------------------------------- through files
def test_files_both_frameworks(family, tmp_path):
    _, make, shape = family
    module = make(jnp.float32)
    train_steps(module, shape)
    expected = torch_bridge.torch_state_dict(module)
    jax_file = tmp_path / "from_jax.safetensors"
    assert torch_bridge.save(module, jax_file) == jax_file

    for framework in ("jax", "torch"):
        loaded = torch_bridge.load(jax_file, framework=framework)
        state = torch_bridge.torch_state_dict(loaded) if framework == "jax" else torch_state(loaded)
        assert_same_state(state, expected)
        assert module_config(loaded) == module_config(module)

    # torch -> file -> JAX -> file: the same content. (Not the same bytes: safetensors writes
    # the metadata from a Rust HashMap, in a different key order on every call.)
    twin = torch_bridge.load(jax_file, framework="torch")
    torch_file = tmp_path / "from_torch.safetensors"
    torch_bridge.save(twin, torch_file)
    again = tmp_path / "again.safetensors"
    torch_bridge.save(torch_bridge.load(torch_file, framework="jax"), again)
    reference = torch_bridge.read(jax_file)
    for path in (torch_file, again):
        ckpt = torch_bridge.read(path)
        assert ckpt.metadata == reference.metadata  # class, config, hashes, version
        assert_same_state(ckpt.tensors, reference.tensors)


def test_plain_pytorch_user_loads_the_file(family, tmp_path):
    """No jaxdsc reader involved: safetensors.torch.load_file + load_state_dict(strict=True)."""
    _, make, shape = family
    module = make(jnp.float32)
    train_steps(module, shape)
    path = tmp_path / "model.safetensors"
    torch_bridge.save(module, path)
    cls_name, config = module_config(module)
    spec = torch_bridge.spec.spec_for_name(cls_name)
    user_model = spec.torch_cls(**config)
    user_model.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    assert_same_state(torch_state(user_model), torch_bridge.torch_state_dict(module))
    user_model.eval()
    module.eval()
    x = random_input(shape)
    with torch.no_grad():
        y = user_model(torch.from_numpy(to_nchw(x) if len(shape) > 2 else x)).numpy()
    y_jax = np.asarray(jax_call(module, x))
    y = np.moveaxis(y, 1, -1) if y.ndim > 2 else y
    np.testing.assert_allclose(y_jax, y, rtol=0, atol=1e-5 * np.abs(y).max())  # RTOL32, conftest


def test_standard_torch_layers_load_the_tensors(tmp_path):
    """The state-dict names and layouts are PyTorch's own: nn.Conv2d / nn.BatchNorm2d take them."""
    dw = jaxdsc.DepthwiseConv(3, 3, depth_multiplier=2, kernel_dilation=2, **init_kwargs(0))
    bn = jaxdsc.BatchNorm(3)
    jax_call(bn, random_input((4, 5, 5, 3)))
    torch_bridge.save(dw, tmp_path / "dw.safetensors")
    torch_bridge.save(bn, tmp_path / "bn.safetensors")
    conv = torch.nn.Conv2d(3, 6, 3, groups=3, dilation=2, padding=2)  # SAME for odd k, stride 1
    conv.load_state_dict(safetensors.torch.load_file(str(tmp_path / "dw.safetensors")))
    bn2d = torch.nn.BatchNorm2d(3)
    bn2d.load_state_dict(safetensors.torch.load_file(str(tmp_path / "bn.safetensors")))
    assert int(bn2d.num_batches_tracked) == 1
    bn2d.eval()
    bn.eval()
    x = random_input((2, 6, 5, 3))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(jax_call(dw, x)), np.moveaxis(conv(torch.from_numpy(to_nchw(x))).numpy(), 1, -1),
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jax_call(bn, x)), np.moveaxis(bn2d(torch.from_numpy(to_nchw(x))).numpy(), 1, -1),
                                   rtol=0, atol=1e-5)


# ---------------------------------------------------------------- other dtypes
@pytest.mark.parametrize("name", ["SeparableConv-all", "DSCNet"])
def test_bfloat16_model_round_trips(name, tmp_path):
    """Regression: a bf16 DSCNet used to fail ("tensors mix floating dtypes"): its Normalize
    was always float32. Every float tensor is now bf16, in memory and on disk."""
    make, shape = FAMILIES[name]
    module = abstract_then_filled(make, jnp.bfloat16)
    train_steps(module, shape)
    expected = torch_bridge.torch_state_dict(module)
    assert {a.dtype.name for a in expected.values()} <= {"bfloat16", "int64"}
    twin = torch_bridge.to_torch(module)
    assert {t.dtype for t in twin.state_dict().values()} <= {torch.bfloat16, torch.int64}
    assert_same_state(torch_bridge.torch_state_dict(torch_bridge.from_torch(twin)), expected)
    path = tmp_path / "bf16.safetensors"
    torch_bridge.save(module, path)
    for framework in ("jax", "torch"):
        loaded = torch_bridge.load(path, framework=framework)
        state = torch_bridge.torch_state_dict(loaded) if framework == "jax" else torch_state(loaded)
        assert_same_state(state, expected)
    assert module_dtype(torch_bridge.load(path)) == jnp.bfloat16


@pytest.mark.parametrize("name", ["SeparableConv-all", "DSCNet"])
def test_float64_model_round_trips(name, tmp_path):
    """Regression: a float64 DSCNet used to fail conversion (float32 Normalize)."""
    make, shape = FAMILIES[name]
    with x64_enabled():
        module = abstract_then_filled(make, jnp.float64)
        train_steps(module, shape)
        expected = torch_bridge.torch_state_dict(module)
        assert {a.dtype.name for a in expected.values()} <= {"float64", "int64"}
        assert_same_state(torch_bridge.torch_state_dict(torch_bridge.from_torch(torch_bridge.to_torch(module))),
                          expected)
        torch_bridge.save(module, tmp_path / "f64.safetensors")
        assert_same_state(torch_bridge.torch_state_dict(torch_bridge.load(tmp_path / "f64.safetensors")), expected)


def test_partial_config_in_file_loads_in_both_frameworks(tmp_path):
    """Regression: a file whose config omits defaulted arguments (write_state accepts it) loaded in
    torch but raised KeyError in JAX; omitted arguments now take their defaults in both."""
    twin = tnn.SeparableBlock(4, 4, 3)
    state = torch_state(twin)
    path = tmp_path / "partial.safetensors"
    torch_bridge.checkpoint.write_state(path, "SeparableBlock",
                                        {"in_channels": 4, "out_channels": 4, "kernel_size": 3}, state)
    jax_module = torch_bridge.load(path, framework="jax")
    torch_module = torch_bridge.load(path, framework="torch")
    assert module_config(jax_module) == module_config(torch_module) == module_config(twin)
    assert jax_module.bn_dw.momentum == 0.9 and torch_module.bn_dw.momentum == 0.1
    assert_same_state(torch_bridge.torch_state_dict(jax_module), state)
