"""jaxdsc:unet and its PyTorch twin: parity (eval, train mode, gradients), odd sizes,
bit-exact round trips, save/load, and the summary's regular-conv figures.

Models are built as torch twins with random weights AND random BatchNorm running
statistics, then converted (no jax.random compiles). Tolerances, relative to
max|reference| in float32: 1e-5 for eval outputs (see conftest.RTOL32), 1e-4
for train-mode outputs and gradients (batch statistics and their backward add
reductions over every pixel, summed in different orders by XLA and oneDNN).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import RTOL32, assert_close, assert_same_state, to_nhwc, torch_input, torch_state
from flax import nnx

import jaxdsc
import torch_bridge
from jaxdsc import models
from torch_bridge import nn as tnn

RTOL_TRAIN = 1e-4
CONFIG = dict(num_classes=3, width=4, depth=2, dilations=(2, 3))


def random_twin(separable: bool = True, seed: int = 0, **kw) -> tnn.UNet:
    torch.manual_seed(seed)
    twin = tnn.UNet(**{**CONFIG, **kw}, separable=separable)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in twin.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
        for name, p in twin.named_parameters():
            if "bn" in name:  # BN scale/bias away from their 1/0 defaults
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.2 * torch.randn(p.shape, generator=g))
    return twin


def images(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize(("separable", "shape"),
                         [(True, (2, 19, 23, 3)), (False, (2, 19, 23, 3)), (True, (1, 16, 12, 3))])
def test_eval_parity(separable, shape):
    twin = random_twin(separable).eval()
    model = torch_bridge.from_torch(twin)
    assert isinstance(model, models.UNet) and model.separable is separable
    x = images(shape)
    y = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    assert y.shape == (*shape[:3], 3)
    with torch.no_grad():
        yt = to_nhwc(twin(torch_input(x)).numpy())
    assert_close(y, yt, RTOL32)


def _loss_and_grads(model, x, cot):
    """Train-mode output, gradients wrt input and params (as a module); updates the statistics."""
    def loss(m, v):
        y = m(v)
        return jnp.sum(y * cot), y

    (_, y), (gp, gx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(model, x)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return y, gx, nnx.merge(graphdef, gp, rest)


def test_train_mode_forward_and_grads():
    # Separable only: the regular variant's ConvBlocks have their own gradient tests
    # (tests/test_gradients.py) and share every other piece of the network.
    twin = random_twin(True, seed=3).train()
    model = torch_bridge.from_torch(twin)
    shape = (2, 13, 11, 3)
    x = images(shape, seed=1)
    cot = np.random.default_rng(2).standard_normal((*shape[:3], 3)).astype(np.float32)
    y, gx, grad_module = _loss_and_grads(model, jnp.asarray(x), jnp.asarray(cot))

    xt = torch_input(x, requires_grad=True)
    yt = twin(xt)
    (yt * torch.from_numpy(cot).permute(0, 3, 1, 2)).sum().backward()
    assert_close(y, to_nhwc(yt.detach().numpy()), RTOL_TRAIN, "train-mode output")
    assert_close(gx, to_nhwc(xt.grad.numpy()), RTOL_TRAIN, "input gradient")

    after = torch_bridge.torch_state_dict(model)
    for k, v in twin.state_dict().items():
        if "running" in k:
            assert_close(after[k], v.numpy(), RTOL_TRAIN, k)
    grads = torch_bridge.torch_state_dict(grad_module)  # laid out as torch parameters
    for k, p in twin.named_parameters():
        assert_close(grads[k], p.grad.numpy(), RTOL_TRAIN, f"gradient of {k}")


def test_round_trips_and_checkpoints(tmp_path):
    twin = random_twin(seed=5).eval()
    state = torch_state(twin)
    model = torch_bridge.from_torch(twin)
    back = torch_bridge.to_torch(model)
    assert type(back) is tnn.UNet and not back.training
    assert_same_state(torch_state(back), state)  # torch -> JAX -> torch
    again = torch_bridge.from_torch(torch_bridge.to_torch(model))
    assert_same_state(torch_bridge.torch_state_dict(again), torch_bridge.torch_state_dict(model))

    for source, name in ((model, "jax.safetensors"), (twin, "torch.safetensors")):
        path = torch_bridge.save(source, tmp_path / name)
        loaded_jax = torch_bridge.load(path, framework="jax")
        loaded_torch = torch_bridge.load(path, framework="torch")
        assert isinstance(loaded_jax, models.UNet) and loaded_jax.dilations == (2, 3)
        assert_same_state(torch_bridge.torch_state_dict(loaded_jax), state)
        assert_same_state(torch_state(loaded_torch), state)
        plain = tnn.UNet(**CONFIG)
        plain.load_state_dict(safetensors.torch.load_file(path), strict=True)
        assert_same_state(torch_state(plain), state)

    regular = torch_bridge.save(random_twin(separable=False), tmp_path / "regular.safetensors")
    with pytest.raises(torch_bridge.CheckpointError, match="missing"):  # not a separable net's file
        torch_bridge.convert.build_jax("UNet", CONFIG, torch_bridge.read(regular).tensors)


def test_create_summary_and_errors():
    model = nnx.eval_shape(lambda: models.create("jaxdsc:unet", rngs=nnx.Rngs(0), **CONFIG))
    regular = nnx.eval_shape(lambda: models.create("jaxdsc:unet", rngs=nnx.Rngs(0), **CONFIG,
                                                   separable=False))
    s, r = jaxdsc.summary(model, (1, 33, 31, 3)), jaxdsc.summary(regular, (1, 33, 31, 3))
    # Every separable block's regular counterpart is exactly the block of the separable=False net.
    assert (s.regular_params, s.regular_macs) == (r.total_params, r.total_macs)
    assert s.total_macs < 0.4 * r.total_macs
    assert s.rows[-1].path == "head" and s.rows[-1].output_shape == (1, 33, 31, 3)
    with pytest.raises(ValueError, match=r"dilations\[1\]"):
        models.UNet(dilations=(2, 0), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="dilations"):
        tnn.UNet(dilations=2)
    with pytest.raises(ValueError, match="channels"):
        torch_bridge.from_torch(random_twin())(jnp.zeros((1, 3, 16, 16)))
