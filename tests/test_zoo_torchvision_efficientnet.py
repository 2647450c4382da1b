"""torchvision's EfficientNet B0-B7 <-> jaxdsc.models (tolerances: tests/_zoo_checks.py).

B0 is checked numerically (eval, train, gradients in float64, round trips, files), B1 in eval;
the bigger variants structurally (every state-dict key and shape, BatchNorm eps / momentum,
the configuration read back from an instance), which is where they differ from B0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import _zoo_checks as zc  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdsc.models  # noqa: E402
import torch_bridge  # noqa: E402
from jaxdsc.models._common import StochasticDepth  # noqa: E402
from torch_bridge import UnsupportedModelError  # noqa: E402


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # upstream's random init


def test_b0_eval_train_roundtrips_files(tmp_path):
    tm = zc.randomize(torchvision.models.efficientnet_b0(num_classes=10, stochastic_depth_prob=0.3), seed=0)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == "torchvision:efficientnet_b0"
    assert jm.config == {"num_classes": 10, "dropout": 0.2, "stochastic_depth_prob": 0.3}
    zc.check_eval(tm, jm, _x((2, 3, 97, 131)))
    zc.check_files(tm, jm, tmp_path)
    zc.check_train(tm, jm, _x((2, 3, 64, 48), seed=1))  # stochastic depth off on both sides


def test_b0_stage_gradients_float64(x64):
    # One stage of B0 (three MBConv blocks: expansion, 5x5 depthwise, SE, residual and stochastic
    # depth) keeps the float64 compile small; the whole model's float32 train pass is checked above.
    tm = zc.randomize(torchvision.models.efficientnet_b0(num_classes=10), seed=6).double()
    jm = torch_bridge.from_torch(tm)
    stage_t, stage_j = tm.features[5], jm.features[5]
    assert len(stage_t) == 3 and stage_t[1].use_res_connect and stage_j[1].use_res_connect
    zc.check_train(stage_t, stage_j, _x((2, 80, 9, 7), seed=7, dtype=np.float64), rtol=zc.GRAD_RTOL64, grads=True)


def test_b0_features_on_cifar_sized_input():
    feats = jax.eval_shape(lambda: jaxdsc.models.create("torchvision:efficientnet_b0", rngs=nnx.Rngs(0))
                           .features(jnp.zeros((2, 32, 32, 3))))
    # 32x32 (CIFAR) ends at 1x1 after the 32x downsampling, before the global pooling
    assert [f.shape[1:] for f in feats] == [(16, 16, 16), (8, 8, 24), (4, 4, 40), (2, 2, 112), (1, 1, 1280)]


def test_b1_eval_numerically():
    # B1 is B0 with depth x1.1 (one more block in five stages: the rounding of repeats is where
    # a table can go wrong); eval only, on a small odd-sized input, to keep the compile short.
    tm = zc.randomize(torchvision.models.efficientnet_b1(num_classes=5), seed=2)
    jm = torch_bridge.from_torch(tm)
    assert sum(len(s) for s in tm.features[1:-1]) == 23  # B0: 16 MBConv blocks
    zc.check_eval(tm, jm, _x((1, 3, 67, 45), seed=3))


@pytest.mark.parametrize("variant", [f"efficientnet_b{i}" for i in range(1, 8)])
def test_bigger_variants_config_read_from_the_instance(variant):
    with torch.device("meta"):
        tm = getattr(torchvision.models, variant)(num_classes=17, stochastic_depth_prob=0.25)
    name, config = torch_bridge.convert.module_config(tm)  # also checks the whole module tree
    assert name == f"torchvision:{variant}"
    assert config == {"num_classes": 17, "stochastic_depth_prob": 0.25, "dropout": tm.classifier[0].p}


def test_b7_structure_and_batchnorm_settings():
    jm = nnx.eval_shape(lambda: jaxdsc.models.create("torchvision:efficientnet_b7", rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        tm = torchvision.models.efficientnet_b7()
    want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    got = {k: s for k, (s, _) in torch_bridge.convert.expected_torch_entries(jm).items()}
    assert got == want
    n_jax = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(jm, nnx.Param)))
    assert n_jax == sum(p.numel() for p in tm.parameters()) > 60_000_000
    bn_t = tm.features[3][2].block[1][1]
    bn_j = jm.features[3][2].block[1][1]
    assert (bn_t.eps, bn_t.momentum) == (1e-3, 0.01)  # torchvision's B5-B7 builders
    assert bn_j.epsilon == bn_t.eps and bn_j.momentum == pytest.approx(1 - bn_t.momentum, abs=1e-12)
    assert jm.config["dropout"] == tm.classifier[0].p == 0.5


def test_stochastic_depth_trains_only():
    sd = StochasticDepth(0.5, "row", rngs=nnx.Rngs(dropout=3))
    x = jnp.ones((4000, 2, 2, 3))
    y = np.asarray(sd(x))
    rows = y.reshape(4000, -1)
    assert set(np.unique(rows)) == {0.0, 2.0} and (rows == rows[:, :1]).all()  # whole samples, 1/(1-p)
    assert abs((rows[:, 0] == 0).mean() - 0.5) < 0.05  # 5 sigma of a binomial(4000, 0.5) fraction
    sd.eval()
    np.testing.assert_array_equal(np.asarray(sd(x)), np.asarray(x))


def test_other_efficientnets_are_refused():
    with torch.device("meta"):
        tm = torchvision.models.efficientnet_v2_s()
    with pytest.raises(UnsupportedModelError, match=r"match none of efficientnet_b0\.\.b7"):
        torch_bridge.convert.module_config(tm)
    with torch.device("meta"):
        tm = torchvision.models.efficientnet_b0()
    tm.features[2][1].block[2].activation = torch.nn.ReLU()
    with pytest.raises(UnsupportedModelError, match=r"features\.2\.1\.block\.2\.activation.*ReLU.*expected.*SiLU"):
        torch_bridge.convert.module_config(tm)
