"""timm's aligned Xception <-> jaxdsc.models (tolerances: tests/_zoo_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import _zoo_checks as zc  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdsc.models  # noqa: E402
import torch_bridge  # noqa: E402
from jaxdsc.models.timm_xception import ARCHS, block_plan  # noqa: E402
from torch_bridge import UnsupportedModelError  # noqa: E402


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _config(**kw):
    return {"num_classes": 1000, "in_chans": 3, "output_stride": 32, "drop_rate": 0.0,
            "drop_path_rate": 0.0, **kw}


def test_xception41_os16_eval_train_roundtrips_files(tmp_path):
    tm = zc.randomize(timm.create_model("xception41", num_classes=5, output_stride=16), seed=0)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == "timm:xception41"
    assert jm.config == _config(num_classes=5, output_stride=16)
    zc.check_eval(tm, jm, _x((1, 3, 65, 97)))  # odd sizes: stride-2 convs round up, as timm's
    zc.check_files(tm, jm, tmp_path)  # before check_train, which moves the statistics
    zc.check_train(tm, jm, _x((2, 3, 33, 47), seed=1))


def test_xception65_os8_eval_and_features():
    tm = zc.randomize(timm.create_model("xception65", num_classes=3, output_stride=8), seed=2).eval()
    jm = torch_bridge.from_torch(tm)
    assert jm.config == _config(num_classes=3, output_stride=8)
    x = _x((1, 3, 41, 57), seed=3)
    zc.check_eval(tm, jm, x)
    feats = nnx.jit(lambda m, x: m.features(x))(jm, zc.nchw_to_nhwc(x))
    with torch.no_grad():
        want = tm.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [i["num_chs"] for i in tm.feature_info]
    assert [i["reduction"] for i in jm.feature_info] == [2, 4, 8, 8, 8]
    for got, w in zip(feats, want, strict=True):
        assert zc.rel_err(zc.nhwc_to_nchw(np.asarray(got)), w.numpy()) <= zc.EVAL_RTOL


def test_preact_xception41p_eval():
    tm = zc.randomize(timm.create_model("xception41p", num_classes=4, output_stride=16), seed=4)
    jm = zc.check_roundtrips(tm)
    assert jm.model_name == "timm:xception41p"
    zc.check_eval(tm, jm, _x((1, 3, 33, 47), seed=5))


@pytest.mark.parametrize("arch,output_stride", [(a, 32) for a in ARCHS] + [("xception65", 16), ("xception71", 8)])
def test_create_matches_upstream_structure(arch, output_stride):
    jm = nnx.eval_shape(lambda: jaxdsc.models.create(f"timm:{arch}", rngs=nnx.Rngs(0),
                                                     output_stride=output_stride))
    with torch.device("meta"):
        tm = timm.create_model(arch, output_stride=output_stride)
    want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    got = {k: s for k, (s, _) in torch_bridge.convert.expected_torch_entries(jm).items()}
    assert got == want
    # timm's dilation rule: every conv of the JAX tree has the upstream stride and dilation.
    convs = {n: m for n, m in tm.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for path, sub in nnx.iter_modules(jm):
        if isinstance(sub, (jaxdsc.Conv, jaxdsc.DepthwiseConv)):
            ref = convs[".".join(map(str, path))]
            assert (sub.strides, sub.kernel_dilation) == (ref.stride, ref.dilation), path
    assert [i["reduction"] for i in jm.feature_info] == [i["reduction"] for i in tm.feature_info]


def test_block_plan_dilation_rule():
    plan = block_plan("xception65", 8)
    assert [b.stride for b in plan[:3]] == [2, 2, 1] and plan[2].dilation == 1
    assert {b.dilation for b in plan[3:19]} == {2} and plan[19].stride == 1
    assert plan[20].dilation == 4
    with pytest.raises(ValueError, match="output_stride"):
        block_plan("xception65", 4)
    with pytest.raises(ValueError, match="arch"):
        block_plan("xception99", 16)


def test_config_read_from_the_instance():
    tm = timm.create_model("xception71", num_classes=0, output_stride=16, drop_rate=0.3,
                           drop_path_rate=0.2, in_chans=1)
    name, config = torch_bridge.convert.module_config(tm)
    assert name == "timm:xception71"
    assert config == _config(num_classes=0, output_stride=16, drop_rate=0.3, drop_path_rate=0.2, in_chans=1)
    tm.pretrained_cfg = {}  # an instance without timm's config: the block layout names it
    assert torch_bridge.convert.module_config(tm)[0] == "timm:xception71"


def test_drop_path_rates_and_modes_as_timm():
    jm = nnx.eval_shape(lambda: jaxdsc.models.create("timm:xception41", rngs=nnx.Rngs(0), drop_rate=0.5,
                                                     drop_path_rate=0.3))
    with torch.device("meta"):
        tm = timm.create_model("xception41", drop_rate=0.5, drop_path_rate=0.3)
    want = [0.0 if b.drop_path is None else b.drop_path.drop_prob for b in tm.blocks]
    got = [0.0 if b.drop_path is None else b.drop_path.p for b in jm.blocks]
    assert got == pytest.approx(want) and got[-1] == pytest.approx(0.3)
    assert all(b.drop_path is None or b.drop_path.mode == "row" for b in jm.blocks)
    assert jm.head.drop.rate == 0.5
    jm.eval()  # eval() turns every stochastic layer off
    assert all(b.drop_path is None or b.drop_path.deterministic for b in jm.blocks)
    assert jm.head.drop.deterministic


def test_changed_layers_are_refused():
    tm = timm.create_model("xception41")
    tm.blocks[3].stack.act1 = torch.nn.GELU()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.3\.stack\.act1.*GELU"):
        torch_bridge.from_torch(tm)
    tm = timm.create_model("xception41", global_pool="max")
    with pytest.raises(UnsupportedModelError, match="head"):
        torch_bridge.from_torch(tm)
    with pytest.raises(ValueError, match="output_stride"):
        jaxdsc.models.create("timm:xception41", rngs=nnx.Rngs(0), output_stride=4)
    with pytest.raises(ValueError, match="xception65"):  # the registry names close matches
        jaxdsc.models.create("timm:xception66", rngs=nnx.Rngs(0))


def test_bad_state_dict_is_refused():
    tm = timm.create_model("xception41", num_classes=3)
    state = {k: torch_bridge.convert.tensor_to_numpy(v) for k, v in tm.state_dict().items()}
    del state["blocks.5.stack.conv2.bn_pw.running_var"]
    with pytest.raises(UnsupportedModelError, match=r"blocks\.5\.stack\.conv2\.bn_pw\.running_var"):
        torch_bridge.convert.build_jax("timm:xception41", _config(num_classes=3), state)
