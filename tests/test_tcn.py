"""TCN (jaxdsc.models.TCN) against its PyTorch twin, conversion, checkpoints and streaming.

Parity tolerance: ``RTOL32`` (see conftest) relative to the output's scale;
parameters are redrawn at scale 0.5 so every path carries signal (the
N(0, 0.01) downsample and final linear of the initialisation would keep
outputs small and hide errors).
Conversions and files must be bit-exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import RTOL32, assert_close, assert_same_state, to_nchw, to_nhwc, torch_state
from flax import nnx

import torch_bridge
from jaxdsc import models
from jaxdsc.models import TCN
from torch_bridge import nn as tnn
from torch_bridge.convert import module_config, torch_state_dict

CONFIGS = {
    "separable": dict(separable=True),
    "dense": dict(separable=False),
    "separable-gated": dict(separable=True, gated=True),
    "dense-gated-nown": dict(separable=False, gated=True, weight_norm=False),
    "separable-nown": dict(separable=True, weight_norm=False),
    "separable-stem": dict(separable=True, dense_stem=True),
}


@nnx.jit
def _call(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)


def make(seed: int = 0, channels=(6, 6, 4), kernel_size: int = 3, **kw) -> TCN:
    """A small TCN with every parameter redrawn from N(0, 0.5^2) (NumPy, seeded)."""
    # Built abstractly, then filled from NumPy: eager jax.random compiles one kernel per shape.
    m = nnx.eval_shape(lambda: TCN(2, 3, channels, kernel_size=kernel_size, rngs=nnx.Rngs(seed), **kw))
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    params = jax.tree.map(lambda p: jnp.asarray(0.5 * rng.standard_normal(p.shape), p.dtype), params)
    return nnx.merge(graphdef, params, rest)


def x_input(n: int = 2, t: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, t, 2)).astype(np.float32)


@pytest.mark.parametrize("separable", [True, False], ids=["separable", "dense"])
def test_init_is_what_locuslab_effectively_runs(separable):
    """Convs: PyTorch's default U(+-1/sqrt(fan_in)) kernels and biases (locuslab's N(0, 0.01) draw is undone
    by weight_norm's hook, locuslab/TCN#1), g = ||v||; depthwise kernels sqrt(3)x that (variance 1/fan_in,
    so a separable conv keeps a dense conv's output scale); downsample and linear weights N(0, 0.01); the
    same in the PyTorch twin. Sizes give each kernel >= 96 draws, so max|w| > 0.8 b fails with p < 1e-9."""
    m = TCN(32, 3, [48, 64], kernel_size=3, separable=separable, rngs=nnx.Rngs(0))
    params = nnx.to_flat_state(nnx.state(m, nnx.Param))
    seen = set()
    for path, p in params:
        name, v = "/".join(map(str, path)), np.asarray(p[...])
        layer = name.rsplit("/", 1)[0]
        if "conv" in name and name.endswith("kernel"):
            b = 1 / np.sqrt(np.prod(v.shape[:-1]))  # fan-in: taps x inputs of one output
            b *= np.sqrt(3) if "depthwise" in name else 1  # the separable conv keeps the dense one's scale
            assert 0.8 * b < np.abs(v).max() <= b, name
            g = np.asarray(dict(params)[(*path[:-1], "gain")][...])
            np.testing.assert_allclose(g, np.sqrt((v**2).sum(axis=tuple(range(v.ndim - 1)), keepdims=True)),
                                       rtol=1e-6)
            bias = np.asarray(dict(params)[(*path[:-1], "bias")][...])
            assert np.abs(bias).max() <= b and np.abs(bias).max() > 0, layer
            seen.add("conv")
        elif ("downsample" in name or "linear" in name) and name.endswith("kernel"):
            assert 0.007 < v.std() < 0.013, name  # N(0, 0.01) over >= 96 draws
            seen.add("linear")
    assert seen == {"conv", "linear"}
    twin = tnn.TCN(32, 3, [48, 64], kernel_size=3, separable=separable)
    for name, w in twin.named_parameters():
        if name.endswith("original1"):  # v of a weight-normed conv, (out, in / groups, k)
            b = 1 / np.sqrt(w.shape[1] * w.shape[2]) * (np.sqrt(3) if "depthwise" in name else 1)
            assert 0.8 * b < w.abs().max().item() <= b * (1 + 1e-6), name
            g = twin.get_parameter(name.replace("original1", "original0"))
            torch.testing.assert_close(g, torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True))
        elif name.endswith("weight") and ("downsample" in name or "linear" in name):
            assert 0.007 < w.std().item() < 0.013, name
    assert twin.linear.bias.abs().max().item() > 0  # PyTorch's default bias, not zeros


def test_registry_and_shapes():
    # Shapes only, so built and called abstractly (no per-shape jax.random compiles, no eager dispatch);
    # the forward's values are checked against the twin in test_parity_and_grads.
    m = nnx.eval_shape(lambda: models.create("jaxdsc:tcn", in_features=2, out_features=3, channels=[4, 5],
                                             rngs=nnx.Rngs(0)))
    assert isinstance(m, TCN) and m.channels == (4, 5)
    assert nnx.eval_shape(_call, m, jax.ShapeDtypeStruct((2, 7, 2), jnp.float32)).shape == (2, 7, 3)
    assert m.receptive_field == 1 + 2 * 1 * 3


@pytest.mark.parametrize("bad", [dict(channels=()), dict(channels=[4, 0]), dict(dropout=1.0),
                                 dict(kernel_size=0), dict(separable="yes"), dict(dense_stem=1)])
def test_bad_arguments(bad):
    kw = dict(in_features=2, out_features=3, channels=[4]) | bad
    with pytest.raises((ValueError, TypeError)):
        TCN(**kw, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_and_grads(name):
    """Eval and train mode (dropout 0) forward, and parameter gradients, equal the twin's."""
    m = make(**CONFIGS[name])
    twin = torch_bridge.to_torch(m)
    x = x_input()
    w = np.random.default_rng(2).standard_normal((2, 40, 3)).astype(np.float32)

    def loss(model, xx):
        return jnp.sum(model(xx) * w)

    y = _call(m, jnp.asarray(x))
    g = nnx.jit(nnx.grad(loss))(m, jnp.asarray(x))  # jitted: eager dispatch of many small ops is slow
    xt = torch.from_numpy(to_nchw(x))
    for train in (True, False):
        twin.train(train)
        twin.zero_grad()
        yt = twin(xt)
        assert_close(y, to_nhwc(yt.detach().numpy()), RTOL32, f"{name} forward (train={train})")
    (yt * torch.from_numpy(to_nchw(w))).sum().backward()
    # The JAX gradient as a module, so the spec table maps it to torch names and layouts.
    graphdef, _, rest = nnx.split(m, nnx.Param, ...)
    g_torch = torch_state_dict(nnx.merge(graphdef, g, rest))
    grads = {k: p.grad.numpy() for k, p in twin.named_parameters()}
    assert sorted(grads) == sorted(g_torch)
    for k, gt in grads.items():
        assert_close(g_torch[k], gt, 1e-4, f"{name} grad {k}")


def test_dense_stem_makes_only_the_first_conv_dense():
    m = make(dense_stem=True)
    convs = [c for b in m.blocks for c in (b.conv1, b.conv2)]
    assert [c.conv is not None for c in convs] == [True] + [False] * (len(convs) - 1)
    assert m.blocks[0].conv1.conv.kernel.shape == (3, 2, 6)  # (k, in, out): dense on the 2 inputs
    plain = make()
    n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    dense = 3 * 2 * 6 + 6 + 6  # kernel, bias, gain
    separable = (3 * 2 + 2 + 2) + (2 * 6 + 6 + 6)  # depthwise, pointwise
    assert n - sum(p.size for p in jax.tree.leaves(nnx.state(plain, nnx.Param))) == dense - separable


@pytest.mark.parametrize("name", ["separable", "dense-gated-nown", "separable-stem"])
def test_round_trips_bit_exact(name, tmp_path):
    m = make(seed=3, **CONFIGS[name])
    state = torch_state_dict(m)
    twin = torch_bridge.to_torch(m)
    assert_same_state(torch_state(twin), state)
    back = torch_bridge.from_torch(twin)
    assert_same_state(torch_state_dict(back), state)
    assert module_config(back) == module_config(m) == module_config(twin)
    # torch -> JAX -> torch from a twin built (and initialised) on the torch side
    t0 = tnn.TCN(2, 3, [5, 4], kernel_size=2, **{k.replace("features", "channels"): v
                                                  for k, v in CONFIGS[name].items()})
    assert_same_state(torch_state(torch_bridge.to_torch(torch_bridge.from_torch(t0))), torch_state(t0))
    # files, both frameworks, and plain PyTorch reading them
    path = torch_bridge.save(m, tmp_path / "tcn.safetensors")
    assert_same_state(torch_state_dict(torch_bridge.load(path, framework="jax")), state)
    loaded = torch_bridge.load(path, framework="torch")
    assert_same_state(torch_state(loaded), state)
    plain = tnn.TCN(**module_config(m)[1])
    plain.load_state_dict(safetensors.torch.load_file(path), strict=True)
    assert_same_state(torch_state(plain), state)
    x = x_input(t=17)
    loaded.eval()
    assert_close(np.asarray(_call(m, jnp.asarray(x))), to_nhwc(loaded(torch.from_numpy(to_nchw(x))).detach().numpy()),
                 RTOL32)


def test_weight_norm_layer_alone():
    """A single weight-normed layer converts both ways (torch's parametrised class is seen through)."""
    layer = tnn.WeightNormDepthwiseConv(3, (3,), padding="CAUSAL", dilation=(2,))
    j = torch_bridge.from_torch(layer)
    assert isinstance(j, models.WeightNormDepthwiseConv)
    assert_same_state(torch_state(torch_bridge.to_torch(j)), torch_state(layer))
    # g = ||v|| at initialisation, so the effective kernel is v itself
    np.testing.assert_allclose(np.asarray(j._kernel()), np.asarray(j.kernel[...]), rtol=1e-6)


def test_dropout_train_and_eval():
    m = make(dropout=0.5)
    x = jnp.asarray(x_input())
    y0 = m(x)
    y1 = m(x, key=jax.random.key(0))
    assert not np.allclose(y0, y1)
    np.testing.assert_array_equal(y1, m(x, key=jax.random.key(0)))  # seeded: reproducible
    m.eval()
    np.testing.assert_array_equal(m(x, key=jax.random.key(0)), y0)  # eval mode ignores the key
    twin = torch_bridge.to_torch(m)
    assert not twin.training
    assert_close(y0, to_nhwc(twin(torch.from_numpy(to_nchw(np.asarray(x)))).detach().numpy()), RTOL32)


@pytest.mark.parametrize("name", ["separable", "dense", "separable-gated", "separable-stem"])
def test_streaming_equals_full_forward(name):
    """step() from init_cache() reproduces the causal forward one time step at a time, jitted.

    Tolerance 1e-5 relative: the same products summed in a different order
    (per-tap einsum vs the conv kernels), float32.
    """
    m = make(seed=4, kernel_size=3, **CONFIGS[name])
    x = jnp.asarray(x_input(t=33, seed=5))
    y = nnx.jit(lambda mm, xx: mm(xx))(m, x)  # the reference, jitted: eager dispatch of a TCN is slow

    @nnx.jit
    def run(model, xs):
        def body(cache, x_t):
            return model.step(cache, x_t)
        _, ys = jax.lax.scan(body, model.init_cache(xs.shape[0]), jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1)

    assert_close(run(m, x), y, RTOL32, f"{name} streaming")
    cache = m.init_cache(2)
    cache, y0 = m.step(cache, x[:, 0])  # eager too
    assert_close(y0, y[:, 0], RTOL32)
    with pytest.raises(ValueError, match="x_t"):
        m.step(cache, x[:, :2])


def test_plain_torch_weight_normed_conv1d_loads_the_tensors():
    """The dense weight-normed conv's keys and layouts are PyTorch's own weight_norm(nn.Conv1d)."""
    j = models.WeightNormConv(3, 5, (3,), padding="CAUSAL", kernel_dilation=(2,), rngs=nnx.Rngs(0))
    plain = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(3, 5, 3, dilation=2))
    plain.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in torch_state_dict(j).items()}, strict=True)
    x = x_input(t=11)[..., :1].repeat(3, axis=-1)
    with torch.no_grad():  # causal = left-pad (k-1)*d, then a VALID conv
        yt = plain(torch.nn.functional.pad(torch.from_numpy(to_nchw(x)), (4, 0))).numpy()
    assert_close(np.asarray(j(jnp.asarray(x))), to_nhwc(yt), RTOL32)


@pytest.mark.parametrize("name,t", [("separable", 37), ("dense-gated-nown", 40), ("separable-stem", 1),
                                    ("dense", 9)])
def test_last_is_the_full_forwards_last_step(name, t):
    """TCN.last (level i on every 2**i-th step) equals the full forward's last step, with its gradients,
    and the twin's ``last`` equals both.

    ``t`` covers lengths whose last step is not on every level's grid from step 0 (37, 9), one shorter
    than the coarsest grid spacing 4 (1) and one a multiple of it (40). Tolerance RTOL32 (forward) and
    1e-4 (gradients, as the parity test): the same products, summed by kernels of other lengths.
    """
    m = make(seed=6, **CONFIGS[name])
    xn = x_input(t=t, seed=7)
    x = jnp.asarray(xn)

    def value_and_grad(f):  # the output and the gradient of sum(sin(output)) from one compiled program
        def loss(mm, xx):
            y = f(mm, xx)
            return jnp.sum(jnp.sin(y)), y
        (_, y), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(m, x)
        return y, g

    full, g_full = value_and_grad(lambda mm, xx: mm(xx)[:, -1])
    last, g_last = value_and_grad(lambda mm, xx: mm.last(xx))
    assert last.shape == (2, 3)
    assert_close(last, full, RTOL32, f"{name} T={t} last")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(g_last)), nnx.to_flat_state(nnx.state(g_full)),
                                 strict=True):
        assert_close(a[...], b[...], 1e-4, f"{name} T={t} grad {path}")
    twin = torch_bridge.to_torch(m).eval()
    with torch.no_grad():
        xt = torch.from_numpy(to_nchw(xn))
        yt = twin.last(xt).numpy()
        assert_close(yt, twin(xt)[:, :, -1].numpy(), RTOL32, f"{name} T={t} twin last")
    assert_close(yt, full, RTOL32, f"{name} T={t} twin vs JAX")
    with pytest.raises(ValueError, match="T >= 1"):
        m.last(x[:, :0])
    with pytest.raises(ValueError, match="T >= 1"):
        twin.last(xt[:, :, :0])
