"""torchvision's MobileNetV3 (large / small) <-> jaxdsc.models (tolerances: tests/_zoo_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import _zoo_checks as zc  # noqa: E402
from flax import nnx  # noqa: E402

import torch_bridge  # noqa: E402
from torch_bridge import UnsupportedModelError  # noqa: E402


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # upstream's random init


def test_large_eval_train_roundtrips_files(tmp_path):
    tm = zc.randomize(torchvision.models.mobilenet_v3_large(num_classes=10), seed=0)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == "torchvision:mobilenet_v3_large"
    assert jm.config == {"width_mult": 1.0, "reduced_tail": False, "dilated": False, "num_classes": 10,
                         "dropout": 0.2}
    zc.check_eval(tm, jm, _x((2, 3, 97, 131)))
    zc.check_files(tm, jm, tmp_path)
    zc.check_train(tm, jm, _x((2, 3, 64, 48), seed=1))


def test_small_reduced_tail_dilated_read_from_the_instance():
    tm = zc.randomize(torchvision.models.mobilenet_v3_small(width_mult=0.75, reduced_tail=True, dilated=True,
                                                            num_classes=5, dropout=0.1), seed=2).eval()
    jm = torch_bridge.from_torch(tm)
    assert jm.model_name == "torchvision:mobilenet_v3_small"
    assert jm.config == {"width_mult": 0.75, "reduced_tail": True, "dilated": True, "num_classes": 5,
                         "dropout": 0.1}
    x = _x((2, 3, 32, 32), seed=3)  # CIFAR-sized: dilated, the tail stays at 2x2 (stride 16)
    zc.check_eval(tm, jm, x)
    feats = nnx.jit(lambda m, x: m.features(x))(jm, zc.nchw_to_nhwc(x))
    assert [f.shape[1] for f in feats] == [16, 8, 4, 2]  # strides 2 (stem), 4, 8, 16 (dilated tail)
    with torch.no_grad():
        want = tm.features(torch.from_numpy(x)).numpy()
    assert zc.rel_err(zc.nhwc_to_nchw(np.asarray(feats[-1])), want) <= zc.EVAL_RTOL


def test_gradients_float64(x64):
    tm = zc.randomize(torchvision.models.mobilenet_v3_small(width_mult=0.5, num_classes=10), seed=6).double()
    jm = torch_bridge.from_torch(tm)
    # PyTorch's float64 Hardsigmoid backward multiplies by 1/6 rounded to float32 (relative error
    # 3.0e-8; measured: torch.autograd.grad of hardsigmoid on float64 is off by 5e-9 = 3e-8 * 1/6),
    # which bounds the agreement of the SE gradients at ~3.4e-8; jaxdsc's is the exact one.
    zc.check_train(tm, jm, _x((2, 3, 64, 48), seed=7, dtype=np.float64), rtol=1e-6, grads=True)


def test_changed_layers_are_refused():
    tm = torchvision.models.mobilenet_v3_large()
    tm.features[4].block[2].scale_activation = torch.nn.Sigmoid()  # SE gate: hardsigmoid -> sigmoid
    with pytest.raises(UnsupportedModelError,
                       match=r"'features\.4\.block\.2\.scale_activation' is .*Sigmoid.*expected .*Hardsigmoid"):
        torch_bridge.from_torch(tm)
    tm = torchvision.models.mobilenet_v3_small()
    tm.features[9].block[1][0].dilation = (3, 3)
    with pytest.raises(UnsupportedModelError, match=r"features\.9\.block\.1\.0"):
        torch_bridge.from_torch(tm)
    tm = torchvision.models.mobilenet_v3_small()
    del tm.features[5]
    with pytest.raises(UnsupportedModelError, match="inverted residual blocks"):
        torch_bridge.from_torch(tm)
