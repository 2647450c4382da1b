"""DeepLabV3+ (jaxdsc:deeplabv3plus) <-> its PyTorch twin torch_bridge.nn.DeepLabV3Plus.

Small heads (``aspp_channels``) and narrow backbones keep the file fast; the
head's code paths (separable and regular ASPP/decoder, pooling branch, both
upsamplings) are the same at any width. Tolerances: tests/_zoo_checks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import _zoo_checks as zc  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdsc.models  # noqa: E402
import torch_bridge  # noqa: E402
from jaxdsc.models.deeplabv3plus import aspp_rates  # noqa: E402
from torch_bridge.nn import DeepLabV3Plus  # noqa: E402

MBV2 = {"width_mult": 0.35, "num_classes": 2}


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _twin(separable: bool, seed: int = 0) -> DeepLabV3Plus:
    return zc.randomize(DeepLabV3Plus("torchvision:mobilenet_v2", MBV2, num_classes=3, output_stride=32,
                                      separable_aspp=separable, aspp_channels=32, low_level_channels=8),
                        seed=seed)


@pytest.mark.parametrize("separable", [True, False])
def test_mobilenet_v2_backbone_eval_train_roundtrips_files(separable, tmp_path):
    tm = _twin(separable)
    jm = zc.check_roundtrips(tm)
    assert jm.config["separable_aspp"] is separable and jm.config["backbone"] == "torchvision:mobilenet_v2"
    x = _x((2, 3, 65, 97))
    y = zc.check_eval(tm, jm, x)
    assert y <= zc.EVAL_RTOL
    # The output's shape by tracing the same call (check_eval ran it): no second compile.
    out = nnx.eval_shape(lambda m, v: m(v), jm, jnp.asarray(zc.nchw_to_nhwc(x)))
    assert out.shape == (2, 65, 97, 3)  # logits at input resolution, NHWC
    zc.check_files(tm, jm, tmp_path)
    # Train mode normalises the image-pooling branch over N values of 1x1 maps: with N = 4 the
    # float32 roundoff reached 1.3e-4 of max|y|; N = 8 keeps it well conditioned (the float64
    # test below proves the function itself).
    zc.check_train(tm, jm, _x((8, 3, 40, 40), seed=1))


def test_gradients_float64(x64):
    config = dict(backbone="torchvision:mobilenet_v2", backbone_kwargs=MBV2, num_classes=3,
                  output_stride=32, separable_aspp=True, aspp_channels=8, low_level_channels=4,
                  dropout=0.1)
    tm = zc.randomize(DeepLabV3Plus(**config), seed=3).double()
    state = {k: torch_bridge.convert.tensor_to_numpy(v) for k, v in tm.state_dict().items()}
    jm = torch_bridge.convert.build_jax("jaxdsc:deeplabv3plus", config, state)
    zc.check_train(tm, jm, _x((2, 3, 40, 40), seed=4, dtype=np.float64), rtol=zc.GRAD_RTOL64, grads=True)


def test_xception_backbone_eval():
    tm = DeepLabV3Plus("timm:xception41", num_classes=4, output_stride=16, aspp_channels=32,
                       low_level_channels=8)
    assert tm.config["backbone_kwargs"] == {"num_classes": 0, "output_stride": 16}
    assert tm.low_index == 1  # the stride-4 tap of the entry flow (256 channels), as the paper
    tm = zc.randomize(tm, seed=5)
    jm = torch_bridge.from_torch(tm.eval())
    zc.check_eval(tm, jm, _x((1, 3, 49, 67), seed=6))


def test_upstream_instance_as_backbone():
    backbone = timm.create_model("xception41", num_classes=0, output_stride=8)
    tm = DeepLabV3Plus(backbone, num_classes=2, output_stride=8, aspp_channels=16, low_level_channels=8)
    assert tm.backbone is backbone
    assert tm.config["backbone"] == "timm:xception41"
    assert tm.config["backbone_kwargs"]["output_stride"] == 8
    assert [b.conv_dw.dilation[0] for b in tm.aspp.branches[1:]] == [12, 24, 36]


def test_structure_and_rates():
    assert aspp_rates(16) == (6, 12, 18) and aspp_rates(8) == (12, 24, 36) and aspp_rates(32) == (3, 6, 9)
    for separable in (True, False):
        jm = nnx.eval_shape(lambda s=separable: jaxdsc.models.create(
            "jaxdsc:deeplabv3plus", rngs=nnx.Rngs(0), backbone="torchvision:mobilenet_v2",
            backbone_kwargs=MBV2, output_stride=32, separable_aspp=s))
        with torch.device("meta"):
            tm = DeepLabV3Plus("torchvision:mobilenet_v2", MBV2, output_stride=32, separable_aspp=separable)
        want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
        got = {k: s for k, (s, _) in torch_bridge.convert.expected_torch_entries(jm).items()}
        assert got == want
        head = [k for k in want if not k.startswith("backbone.")]
        assert any("conv_dw" in k for k in head) is separable


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="output_stride=16 but backbone 'torchvision:mobilenet_v2'"):
        nnx.eval_shape(lambda: jaxdsc.models.create(
            "jaxdsc:deeplabv3plus", rngs=nnx.Rngs(0), backbone="torchvision:mobilenet_v2",
            backbone_kwargs=MBV2, output_stride=16))
    with pytest.raises(ValueError, match="output_stride=16 but backbone 'torchvision:mobilenet_v2'"):
        DeepLabV3Plus("torchvision:mobilenet_v2", MBV2, output_stride=16)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        aspp_rates(4)
    with pytest.raises(ValueError, match="unknown model name"):
        nnx.eval_shape(lambda: jaxdsc.models.create("jaxdsc:deeplabv3plus", rngs=nnx.Rngs(0),
                                                    backbone="timm:xception66"))
