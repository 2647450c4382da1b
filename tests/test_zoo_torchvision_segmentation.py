"""torchvision's DeepLabV3 / LR-ASPP (MobileNetV3-Large) <-> jaxdsc.models (tolerances: tests/_zoo_checks.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import _zoo_checks as zc  # noqa: E402

import torch_bridge  # noqa: E402
from jaxdsc.models._common import resize_bilinear  # noqa: E402
from torch_bridge import UnsupportedModelError  # noqa: E402

seg = torchvision.models.segmentation


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # upstream's random init


@pytest.mark.parametrize("size", [(7, 9), (1, 1), (16, 16), (97, 131), (5, 3)])
def test_resize_bilinear_equals_torch_interpolate(size):
    x = _x((2, 4, 13, 11), seed=size[0])
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
    got = resize_bilinear(jnp.asarray(zc.nchw_to_nhwc(x)), size)
    assert zc.rel_err(zc.nhwc_to_nchw(np.asarray(got)), want.numpy()) <= 1e-6  # float32 lerp of O(1) values


def test_deeplabv3_aux_eval_train_roundtrips_files(tmp_path):
    tm = zc.randomize(seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5,
                                                       aux_loss=True), seed=0)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == "torchvision:deeplabv3_mobilenet_v3_large"
    assert jm.config == {"num_classes": 5, "aux_loss": True}
    zc.check_eval(tm, jm, _x((2, 3, 97, 131)))  # both "out" and "aux", resized to 97x131
    zc.check_files(tm, jm, tmp_path)
    zc.check_train(tm, jm, _x((2, 3, 64, 48), seed=1))


def test_lraspp_eval_train_roundtrips():
    tm = zc.randomize(seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3), seed=2)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == "torchvision:lraspp_mobilenet_v3_large" and jm.config == {"num_classes": 3}
    zc.check_eval(tm, jm, _x((1, 3, 65, 47), seed=3))
    zc.check_train(tm, jm, _x((2, 3, 64, 64), seed=4))


def test_deeplabv3_without_aux_and_other_backbones_refused():
    with torch.device("meta"):
        tm = seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
    assert torch_bridge.convert.module_config(tm) == ("torchvision:deeplabv3_mobilenet_v3_large",
                                                      {"num_classes": 21, "aux_loss": False})
    with torch.device("meta"):
        tm = seg.deeplabv3_resnet50(weights=None, weights_backbone=None)
    with pytest.raises(UnsupportedModelError):
        torch_bridge.convert.module_config(tm)
    with torch.device("meta"):
        tm = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    tm.classifier.scale[2] = torch.nn.Hardsigmoid()
    with pytest.raises(UnsupportedModelError, match=r"classifier\.scale\.2.*Hardsigmoid.*expected.*Sigmoid"):
        torch_bridge.convert.module_config(tm)
