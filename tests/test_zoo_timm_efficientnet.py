"""timm's MobileNetV2/V3 and EfficientNet families: JAX models against timm 1.0's own.

Every model under test is built by ``timm.create_model`` and given random
weights and random BatchNorm statistics (never the 0/1 defaults), then the
JAX model is filled with the same tensors.

Tolerances (float32, relative to ``max |reference|``): eval outputs and
feature maps 1e-5 (XLA and oneDNN sum in different orders; any wrong tap,
padding or channel order gives errors of order 1); train-mode outputs,
running statistics and gradients 1e-4 (batch statistics and the backward pass
add reductions over the whole batch, each with its own rounding).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdsc import models
from jaxdsc.models.timm_efficientnet import ARCHS, TimmEfficientNet, TimmMobileNetV3, decode_arch
from torch_bridge.convert import tensor_to_numpy
from torch_bridge.spec import spec_for

timm = pytest.importorskip("timm")

EVAL_RTOL = 1e-5
TRAIN_RTOL = 1e-4


# ---------------------------------------------------------------- helpers (temporary, until tests/_zoo_checks.py)
def _leaves(jm):
    """(torch key, JAX variable, layout, rank) for every tensor of the JAX model."""
    for path, sub in nnx.iter_modules(jm):
        try:
            spec = spec_for(sub)
        except TypeError:
            continue
        prefix = "".join(f"{p}." for p in path)
        for rule in spec.tensors:
            var = getattr(sub, rule.jax)
            if var is not None:
                yield prefix + rule.torch, var, rule.layout, spec.rank(sub)


def _jax_cls(name):
    return TimmEfficientNet if ARCHS[name].cls == "efficientnet" else TimmMobileNetV3


def _from_timm(tm, name, **kw):
    jm = nnx.eval_shape(lambda: _jax_cls(name)(name, rngs=nnx.Rngs(0), **kw))
    sd = {k: tensor_to_numpy(v) for k, v in tm.state_dict().items()}
    keys = set()
    for key, var, layout, _ in _leaves(jm):
        var.set_value(jnp.asarray(layout.to_jax(sd[key])))
        keys.add(key)
    assert keys == set(sd)
    return jm


def _timm_model(name, seed=0, **kw):
    """timm's model with its (random) init plus random BN affine/statistics and random biases."""
    torch.manual_seed(seed)
    tm = timm.create_model(name, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, t in tm.state_dict().items():
            if n.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif n.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif n.endswith("num_batches_tracked"):
                t.fill_(3)
            elif t.ndim == 1:  # BN weight/bias, SE/head/classifier biases
                base = 1.0 if n.endswith("weight") else 0.0
                t.copy_(base + torch.randn(t.shape, generator=g) * 0.2)
    return tm


def _nhwc(x):
    return jnp.asarray(np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1))))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _jit_eval(jm, fn="__call__"):
    gd, st = nnx.split(jm)
    f = jax.jit(lambda st, x: getattr(nnx.merge(gd, st), fn)(x))
    return lambda x: f(st, x)


# ---------------------------------------------------------------- structure
BIG = ["efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "tf_efficientnet_b7"]


@pytest.mark.parametrize("name,kw", [
    *[(n, {}) for n in BIG],
    ("mobilenetv2_120d", {"num_classes": 3}),
    ("mobilenetv3_large_150d", {"num_classes": 0}),
    ("efficientnet_b3", {"output_stride": 8, "drop_path_rate": 0.2, "in_chans": 1}),
])
def test_structure_matches_timm(name, kw):
    """State-dict keys and shapes of every tensor (meta device vs nnx.eval_shape), and timm's
    per-block stride/dilation/padding/eps/drop-path (the big variants are only checked this way)."""
    with torch.device("meta"):
        tm = timm.create_model(name, **kw)
    jm = nnx.eval_shape(lambda: _jax_cls(name)(name, rngs=nnx.Rngs(0), **kw))
    want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    got = {k: layout.torch_shape(tuple(var.get_value().shape), rank) for k, var, layout, rank in _leaves(jm)}
    assert got == want
    tblocks = [b for stage in tm.blocks for b in stage]
    jblocks = [b for stage in jm.plan.stages for b in stage]
    assert len(tblocks) == len(jblocks)
    for tb, jb in zip(tblocks, jblocks, strict=True):
        conv = tb.conv_dw if hasattr(tb, "conv_dw") else tb.conv
        assert (conv.stride[0], conv.dilation[0]) == (jb.stride, jb.dilation)
        dp = getattr(tb.drop_path, "drop_prob", 0.0)
        assert dp == jb.drop_path
        assert tb.bn1.eps == ARCHS[name].eps
    assert [f["num_chs"] for f in tm.feature_info] == list(jm.feature_channels)


# ---------------------------------------------------------------- numerical parity
CONFIGS = [
    ("mobilenetv2_035", {"num_classes": 10}, (97, 131)),
    ("mobilenetv3_small_050", {"num_classes": 7}, (97, 131)),
    ("tf_efficientnet_b0", {"num_classes": 5, "output_stride": 16}, (97, 131)),
    ("efficientnet_b0", {"num_classes": 0, "in_chans": 1}, (64, 64)),
    ("tf_mobilenetv3_large_075", {}, (64, 80)),
]


@pytest.mark.parametrize("name,kw,hw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_eval_parity(name, kw, hw):
    tm = _timm_model(name, **kw).eval()
    jm = _from_timm(tm, name, **kw)
    jm.eval()
    x = np.random.default_rng(0).standard_normal((2, tm.in_chans, *hw)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    got = _jit_eval(jm)(_nhwc(x))
    assert got.shape == want.shape
    assert _rel(got, want) <= EVAL_RTOL


@pytest.mark.parametrize("name,kw,hw", [CONFIGS[1], CONFIGS[2]], ids=[CONFIGS[1][0], CONFIGS[2][0]])
def test_train_forward_and_gradients(name, kw, hw):
    """Train mode (batch statistics): outputs, updated running stats and the gradients wrt the
    input and every parameter; dropout and stochastic depth are off for this comparison."""
    tm = _timm_model(name, **kw).train()
    jm = _from_timm(tm, name, **kw)
    jm.train()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, tm.in_chans, *hw)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tm(xt)
    w = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    (yt * torch.from_numpy(w)).sum().backward()

    wj = jnp.asarray(w)

    @nnx.jit
    def step(m, x):
        def loss(m, x):
            y = m(x)
            return jnp.sum(y * wj), y

        return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)

    (_, y), (gp, gx) = step(jm, _nhwc(x))  # also updates jm's running statistics
    assert _rel(y, yt.detach().numpy()) <= TRAIN_RTOL
    assert _rel(gx, np.transpose(xt.grad.numpy(), (0, 2, 3, 1))) <= TRAIN_RTOL
    tgrads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    gmodel = nnx.merge(nnx.graphdef(jm), gp, nnx.state(jm, nnx.Not(nnx.Param)))  # grads named by the walker
    # A bias that feeds a train-mode BatchNorm (the last BN of a block without a shortcut) has a
    # true gradient of 0: the batch mean cancels it, and both frameworks leave float32 rounding
    # noise there. A float64 run of timm's model finds those tensors; they must be noise-sized.
    tm64 = copy.deepcopy(tm).double()
    (tm64(torch.from_numpy(x).double()) * torch.from_numpy(w).double()).sum().backward()
    zero = {n for n, p in tm64.named_parameters() if p.grad.abs().max() <= 1e-12}
    floor = 1e-3 * max(np.abs(g).max() for g in tgrads.values())
    checked = 0
    for key, var, layout, rank in _leaves(gmodel):
        if key in tgrads:
            got, want = layout.to_torch(np.asarray(var.get_value()), rank), tgrads[key]
            if key in zero:
                assert np.abs(got).max() <= floor, key
            else:
                assert _rel(got, want) <= TRAIN_RTOL, key
            checked += 1
    assert checked == len(tgrads)
    tstate = tm.state_dict()
    for key, var, layout, rank in _leaves(jm):
        if "running" in key:
            assert _rel(layout.to_torch(np.asarray(var.get_value()), rank), tstate[key].numpy()) <= TRAIN_RTOL
        elif key.endswith("num_batches_tracked"):
            assert int(var.get_value()) == int(tstate[key])


@pytest.mark.parametrize("name,kw,hw", [
    ("mobilenetv3_small_050", {}, (97, 131)),  # the stem is the first tap (first block has stride 2)
    ("efficientnet_b0", {"output_stride": 8}, (64, 64)),
])
def test_features_match_timm_features_only(name, kw, hw):
    tm = _timm_model(name, **kw).eval()
    jm = _from_timm(tm, name, **kw)
    jm.eval()
    ft = timm.create_model(name, features_only=True, **kw).eval()
    ft.load_state_dict({k: v for k, v in tm.state_dict().items() if k in ft.state_dict()}, strict=True)
    x = np.random.default_rng(2).standard_normal((1, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        want = [f.numpy() for f in ft(torch.from_numpy(x))]
    got = _jit_eval(jm, "features")(_nhwc(x))
    assert len(got) == len(want) == 5
    for g, w_ in zip(got, want, strict=True):
        w_ = np.transpose(w_, (0, 2, 3, 1))
        assert g.shape == w_.shape
        assert _rel(g, w_) <= EVAL_RTOL


# ---------------------------------------------------------------- stochastic parts, registry, errors
def test_drop_path_and_dropout_need_rngs_only_in_training():
    jm = models.create("timm:mobilenetv3_small_050", rngs=nnx.Rngs(0), num_classes=4, drop_rate=0.5,
                       drop_path_rate=0.5)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 32, 3)), jnp.float32)
    with pytest.raises(ValueError, match="rngs"):
        jm(x)
    a, b = jm(x, rngs=nnx.Rngs(dropout=1)), jm(x, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)
    jm.eval()
    np.testing.assert_array_equal(jm(x), jm(x, rngs=nnx.Rngs(dropout=1)))


def test_registry_names_and_config():
    names = models.list_models("timm:*")
    for n in ("timm:mobilenetv2_100", "timm:tf_efficientnet_b7", "timm:mobilenetv3_small_075",
              "timm:tf_mobilenetv3_large_minimal_100"):
        assert n in names
    m = nnx.eval_shape(lambda: models.create("timm:efficientnet_b1", rngs=nnx.Rngs(0), num_classes=3))
    assert m.model_name == "timm:efficientnet_b1"
    assert m.config == {"num_classes": 3, "in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0,
                        "output_stride": 32}
    with pytest.raises(TypeError, match="output_stride"):  # timm's MobileNetV3 has no output_stride either
        models.create("timm:mobilenetv3_large_100", rngs=nnx.Rngs(0), output_stride=16)
    with pytest.raises(ValueError, match="output_stride"):
        models.create("timm:efficientnet_b0", rngs=nnx.Rngs(0), output_stride=12)
    with pytest.raises(ValueError, match="arch must be one of"):
        TimmEfficientNet("mobilenetv3_large_100", rngs=nnx.Rngs(0))


def test_decoder_depth_scaling_matches_timm():
    """Repeats per stage after depth scaling for every arch (timm's _scale_stage_depth)."""
    from timm.models._efficientnet_builder import _scale_stage_depth

    for name, arch in ARCHS.items():
        plan = decode_arch(arch)
        for i, (strings, stage) in enumerate(zip(arch.blocks, plan.stages, strict=True)):
            reps = [int(s.split("_r")[1].split("_")[0]) for s in strings]
            fixed = arch.fix_first_last and i in (0, len(arch.blocks) - 1)
            want = _scale_stage_depth([{}] * len(reps), reps, 1.0 if fixed else arch.depth_multiplier)
            assert len(stage) == len(want), name
