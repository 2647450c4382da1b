"""timm's MobileNetV2/V3 and EfficientNet families <-> jaxdsc.models (tolerances: tests/_zoo_checks.py).

Every upstream model is built by ``timm.create_model`` (random init) and then given random
biases, BatchNorm affine parameters and running statistics (``_zoo_checks.randomize``); the
JAX model comes from ``torch_bridge.from_torch``, so the configuration is read from the
instance. The biggest variants (B5-B7) are checked structurally only (state-dict keys and
shapes on the ``meta`` device against ``nnx.eval_shape``, plus every block's stride,
dilation and stochastic-depth rate).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import _zoo_checks as zc  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdsc.models  # noqa: E402
import torch_bridge  # noqa: E402
from jaxdsc.models.timm_efficientnet import ARCHS, decode_arch  # noqa: E402
from torch_bridge import UnsupportedModelError  # noqa: E402
from torch_bridge.convert import expected_torch_entries  # noqa: E402


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _timm(name, seed=0, **kw):
    torch.manual_seed(seed)  # timm's random init
    return zc.randomize(timm.create_model(name, **kw), seed=seed)


def _abstract(name, **kw):
    return nnx.eval_shape(lambda: jaxdsc.models.create(f"timm:{name}", rngs=nnx.Rngs(0), **kw))


# ---------------------------------------------------------------- structure (all sizes)
@pytest.mark.parametrize("name,kw", [
    ("efficientnet_b5", {}),
    ("efficientnet_b6", {}),
    ("efficientnet_b7", {"num_classes": 10}),
    ("mobilenetv2_120d", {"num_classes": 3}),
    ("mobilenetv3_large_150d", {"num_classes": 0}),
    ("efficientnet_b3", {"output_stride": 8, "drop_path_rate": 0.3, "in_chans": 1}),
])
def test_structure_matches_timm(name, kw):
    with torch.device("meta"):
        tm = timm.create_model(name, **kw)
    jm = _abstract(name, **kw)
    want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert {k: s for k, (s, _) in expected_torch_entries(jm).items()} == want
    tblocks = [b for stage in tm.blocks for b in stage]
    jblocks = [b for stage in jm.plan.stages for b in stage]
    for tb, jb in zip(tblocks, jblocks, strict=True):
        conv = tb.conv_dw if hasattr(tb, "conv_dw") else tb.conv
        assert (conv.stride[0], conv.dilation[0], conv.kernel_size[0]) == (jb.stride, jb.dilation, jb.kernel)
        assert getattr(tb.drop_path, "drop_prob", 0.0) == jb.drop_path  # bit-equal rates
        assert tb.bn1.eps == ARCHS[name].eps
    assert [f["num_chs"] for f in tm.feature_info] == list(jm.feature_channels)
    # The configuration read back from the (meta) instance is the one it was built with.
    name_read, config = torch_bridge.zoo._family.family_for_torch(tm).config_from_torch(tm)
    assert (name_read, config) == (jm.model_name, jm.config)


def test_depth_scaling_matches_timm_for_every_arch():
    from timm.models._efficientnet_builder import _scale_stage_depth

    for name, arch in ARCHS.items():
        for i, (strings, stage) in enumerate(zip(arch.blocks, decode_arch(arch).stages, strict=True)):
            reps = [int(s.split("_r")[1].split("_")[0]) for s in strings]
            fixed = arch.fix_first_last and i in (0, len(arch.blocks) - 1)
            want = _scale_stage_depth([{}] * len(reps), reps, 1.0 if fixed else arch.depth_multiplier)
            assert len(stage) == len(want), name


# ---------------------------------------------------------------- numerical parity
CONFIGS = [  # (name, timm kwargs, eval input HxW, train-mode check)
    ("mobilenetv2_035", {"num_classes": 10}, (97, 131), True),
    ("mobilenetv3_small_050", {"num_classes": 7, "drop_rate": 0.2, "drop_path_rate": 0.1}, (97, 131), False),
    ("tf_efficientnet_b0", {"num_classes": 5, "output_stride": 16}, (97, 131), False),
    ("tf_mobilenetv3_small_075", {"num_classes": 0, "in_chans": 1}, (64, 80), False),
]


@pytest.mark.parametrize("name,kw,hw,train", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_eval_train_roundtrips_files(name, kw, hw, train, tmp_path):
    tm = _timm(name, **kw)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == f"timm:{name}"
    assert {k: jm.config[k] for k in kw} == kw
    zc.check_eval(tm, jm, _x((2, tm.in_chans, *hw)))
    zc.check_files(tm, jm, tmp_path)
    if train:
        zc.check_train(tm, jm, _x((2, tm.in_chans, 64, 48), seed=1))


def test_gradients_float64(x64):
    # Every block kind (ds / ir / cn), SE with a hard-sigmoid gate, relu and hardswish; float64
    # as explained in tests/_zoo_checks.py. Tolerance 1e-7 instead of GRAD_RTOL64: PyTorch's
    # Hardsigmoid backward multiplies by the float32 constant 1.0f / 6.0f even in float64 (a
    # relative error of 2**-25 = 3.0e-8 on every gradient through an SE gate, measured), while
    # JAX divides by 6 exactly. 1e-7 covers that and stays 1e5 below a real mistake.
    tm = _timm("mobilenetv3_small_050", seed=3, num_classes=6).double()
    jm = torch_bridge.from_torch(tm)
    zc.check_train(tm, jm, _x((2, 3, 32, 32), seed=4, dtype=np.float64), rtol=1e-7, grads=True)


@pytest.mark.parametrize("name,kw,hw", [
    ("mobilenetv3_small_050", {}, (97, 131)),  # the stem is the first tap (first block has stride 2)
])
def test_features_match_timm_features_only(name, kw, hw):
    tm = _timm(name, **kw).eval()
    jm = torch_bridge.from_torch(tm)
    ft = timm.create_model(name, features_only=True, **kw).eval()
    ft.load_state_dict({k: v for k, v in tm.state_dict().items() if k in ft.state_dict()}, strict=True)
    x = _x((1, 3, *hw), seed=2)
    with torch.no_grad():
        want = [f.numpy() for f in ft(torch.from_numpy(x))]
    got = nnx.jit(lambda m, x: m.features(x))(jm, zc.nchw_to_nhwc(x))
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        assert zc.rel_err(zc.nhwc_to_nchw(np.asarray(g)), w) <= zc.EVAL_RTOL


# ---------------------------------------------------------------- stochastic parts, registry, refusals
def test_drop_path_drops_whole_samples_only_in_training():
    """timm's DropPath: per sample, the residual branch is dropped or scaled by 1 / (1 - p)."""
    from jaxdsc.models._timm_blocks import BlockCfg, InvertedResidual

    cfg = BlockCfg("ir", 8, 8, 3, 1, 1, "relu", 16, drop_path=0.5)
    block = InvertedResidual(cfg, padding="SYMMETRIC", eps=1e-5, rngs=nnx.Rngs(0, dropout=1))
    x = jnp.asarray(_x((64, 5, 5, 8), seed=5))
    block.eval()
    branch = block(x) - x  # the deterministic residual branch (eval-mode BatchNorm)
    block.train()
    block.set_attributes(use_running_average=True)  # keep BatchNorm in eval: only DropPath varies
    out = block(x) - x
    dropped = np.all(np.asarray(out) == 0, axis=(1, 2, 3))
    assert 10 < dropped.sum() < 54  # p = 0.5 of 64 samples
    np.testing.assert_allclose(np.asarray(out)[~dropped], 2 * np.asarray(branch)[~dropped], rtol=1e-5,
                               atol=1e-6)
    jm = _abstract("mobilenetv3_small_050", drop_rate=0.3)
    assert jm.drop.rate == 0.3


def test_registry_names_and_config():
    names = jaxdsc.models.list_models("timm:*")  # also holds other timm families (xception)
    assert {f"timm:{a}" for a in ARCHS} <= set(names)
    assert {"timm:mobilenetv2_100", "timm:tf_efficientnet_b7", "timm:mobilenetv3_small_075"} <= set(names)
    assert _abstract("efficientnet_b1", num_classes=3).config == {
        "num_classes": 3, "in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0, "output_stride": 32}
    with pytest.raises(TypeError, match="output_stride"):  # timm's MobileNetV3 class has none either
        jaxdsc.models.create("timm:mobilenetv3_large_100", rngs=nnx.Rngs(0), output_stride=16)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        jaxdsc.models.create("timm:efficientnet_b0", rngs=nnx.Rngs(0), output_stride=12)
    with pytest.raises(ValueError, match="arch must be one of"):
        jaxdsc.models.TimmEfficientNet("mobilenetv3_large_100", rngs=nnx.Rngs(0))


def test_unsupported_timm_models_are_refused():
    with torch.device("meta"):
        tm = timm.create_model("efficientnet_b0", bn_eps=1e-3)  # not what efficientnet_b0 builds
    with pytest.raises(UnsupportedModelError, match=r"module 'bn1' is .*eps=0\.001.*expected .*eps=1e-05"):
        torch_bridge.from_torch(tm)
    with torch.device("meta"):
        tm = timm.create_model("tf_mobilenetv3_small_100")
    tm.blocks[1][0].bn1.act = torch.nn.ReLU6()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.0\.bn1\.act"):
        torch_bridge.from_torch(tm)
    with torch.device("meta"):
        tm = timm.create_model("mnasnet_100")  # the EfficientNet class, another architecture
    with pytest.raises(UnsupportedModelError, match="architecture 'mnasnet_100' is not supported"):
        torch_bridge.from_torch(tm)
    del tm.pretrained_cfg
    with pytest.raises(UnsupportedModelError, match="cannot read pretrained_cfg"):
        torch_bridge.from_torch(tm)
    with torch.device("meta"):
        tm = timm.create_model("efficientnet_b0", features_only=True)  # EfficientNetFeatures
    with pytest.raises(ValueError):
        torch_bridge.from_torch(tm)


def test_state_dict_mismatches_are_refused():
    jm = _abstract("mobilenetv3_small_050", num_classes=10)
    state = {k: np.zeros(s, d) for k, (s, d) in expected_torch_entries(jm).items()}
    bad = dict(state)
    del bad["blocks.2.1.se.conv_expand.bias"]
    with pytest.raises(UnsupportedModelError, match=r"missing 1 tensor\(s\): blocks\.2\.1\.se\.conv_expand\.bias"):
        torch_bridge.convert.build_jax("timm:mobilenetv3_small_050", jm.config, bad)
    bad = dict(state, **{"classifier.weight": np.zeros((11, 1024), np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"classifier\.weight.*\(11, 1024\), expected \(10, 1024\)"):
        torch_bridge.convert.build_torch("timm:mobilenetv3_small_050", jm.config, bad)
