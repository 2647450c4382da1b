"""torchvision's MobileNetV2 <-> jaxdsc.models (tolerances: tests/_zoo_checks.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import _zoo_checks as zc  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdsc.models  # noqa: E402
import torch_bridge  # noqa: E402
from torch_bridge import UnsupportedModelError  # noqa: E402
from torch_bridge.convert import tensor_to_numpy  # noqa: E402


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # upstream's random init


def test_default_width_eval_train_roundtrips_files(tmp_path):
    tm = zc.randomize(torchvision.models.mobilenet_v2(num_classes=10), seed=0)
    jm = zc.check_roundtrips(tm)
    assert jm.config == {"num_classes": 10, "width_mult": 1.0, "inverted_residual_setting": None,
                         "round_nearest": 8, "dropout": 0.2}
    zc.check_eval(tm, jm, _x((2, 3, 97, 131)))
    zc.check_files(tm, jm, tmp_path)
    zc.check_train(tm, jm, _x((2, 3, 64, 48), seed=1))


def test_gradients_float64(x64):
    # A short network with every kind of block (expand/no expand, stride 2, residual) keeps the
    # float64 compile small; the JAX side is built from the same config and the upstream weights.
    config = {"num_classes": 10, "width_mult": 0.5, "round_nearest": 8, "dropout": 0.2,
              "inverted_residual_setting": [[1, 16, 1, 1], [6, 24, 2, 2], [4, 32, 2, 1]]}
    tm = zc.randomize(torchvision.models.mobilenet_v2(**config), seed=6).double()
    state = {k: tensor_to_numpy(v) for k, v in tm.state_dict().items()}
    jm = torch_bridge.convert.build_jax("torchvision:mobilenet_v2", config, state)
    assert jm.config == config
    zc.check_train(tm, jm, _x((2, 3, 64, 48), seed=7, dtype=np.float64), rtol=zc.GRAD_RTOL64, grads=True)


@pytest.mark.parametrize("width_mult,num_classes,dropout", [(0.75, 7, 0.5), (0.35, 1000, 0.0)])
def test_width_multipliers_read_from_the_instance(width_mult, num_classes, dropout):
    tm = zc.randomize(torchvision.models.mobilenet_v2(width_mult=width_mult, num_classes=num_classes,
                                                      dropout=dropout), seed=2)
    jm = torch_bridge.from_torch(tm.eval())
    assert jm.config["width_mult"] == width_mult and jm.config["num_classes"] == num_classes
    assert jm.config["dropout"] == dropout
    zc.check_eval(tm, jm, _x((1, 3, 64, 64), seed=3))


def test_features_and_cifar_sized_input():
    tm = zc.randomize(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10), seed=4).eval()
    jm = torch_bridge.from_torch(tm)
    x = _x((2, 3, 32, 32), seed=5)
    zc.check_eval(tm, jm, x)  # the stem and four stride-2 blocks take 32x32 down to 1x1
    feats = nnx.jit(lambda m, x: m.features(x))(jm, zc.nchw_to_nhwc(x))
    assert [f.shape[1] for f in feats] == [16, 8, 4, 2, 1]
    assert [f.shape[-1] for f in feats] == [8, 16, 16, 48, 1280]
    with torch.no_grad():
        want = tm.features(torch.from_numpy(x)).numpy()
    assert zc.rel_err(zc.nhwc_to_nchw(np.asarray(feats[-1])), want) <= zc.EVAL_RTOL


def test_create_matches_upstream_structure():
    jm = nnx.eval_shape(lambda: jaxdsc.models.create("torchvision:mobilenet_v2", rngs=nnx.Rngs(0),
                                                     width_mult=1.4))
    tm = torchvision.models.mobilenet_v2(width_mult=1.4)
    want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    got = {k: s for k, (s, _) in torch_bridge.convert.expected_torch_entries(jm).items()}
    assert got == want
    n_jax = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(jm, nnx.Param)))
    assert n_jax == sum(p.numel() for p in tm.parameters())


def test_changed_layers_are_refused():
    tm = torchvision.models.mobilenet_v2()
    tm.features[2].conv[1][2] = torch.nn.ReLU()  # ReLU6 -> ReLU: same keys, other result
    with pytest.raises(UnsupportedModelError, match=r"module 'features\.2\.conv\.1\.2' is .*ReLU.*expected .*ReLU6"):
        torch_bridge.from_torch(tm)
    tm = torchvision.models.mobilenet_v2()
    c = tm.features[3].conv[1][0]
    tm.features[3].conv[1][0] = torch.nn.Conv2d(c.in_channels, c.out_channels, 3, 2, 1, groups=6, bias=False)
    with pytest.raises(UnsupportedModelError, match=r"features\.3\.conv\.1\.0.*groups=6"):
        torch_bridge.from_torch(tm)
    tm = torchvision.models.mobilenet_v2(inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2]])
    with pytest.raises(UnsupportedModelError, match="inverted residual blocks"):
        torch_bridge.from_torch(tm)
    with pytest.raises(ValueError):  # a ValueError subclass, as the contract says
        torch_bridge.from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_state_dict_mismatches_are_refused():
    tm = torchvision.models.mobilenet_v2(num_classes=10)
    state = {k: tensor_to_numpy(v) for k, v in tm.state_dict().items()}
    name, config = torch_bridge.convert.module_config(tm)
    bad = dict(state)
    del bad["features.5.conv.2.weight"]
    with pytest.raises(UnsupportedModelError, match=r"missing 1 tensor\(s\): features\.5\.conv\.2\.weight"):
        torch_bridge.convert.build_jax(name, config, bad)
    bad = dict(state, **{"classifier.1.weight": np.zeros((11, 1280), np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"classifier\.1\.weight.*\(11, 1280\), expected \(10, 1280\)"):
        torch_bridge.convert.build_torch(name, config, bad)
    with pytest.raises(UnsupportedModelError, match="no bridge family serves"):
        torch_bridge.convert.build_torch("torchvision:mobilenet_v9", {}, state)
