"""The pieces of the CIFAR-10 recipe (issue 16): DSCNet stage layouts, test-time augmentation, and the
validation of the recipe's flags (progressive resizing and the whitened stem have their own files)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdsc.models import DSCNet, block_plan
from train import steps
from train.config import PRESETS, ConfigError, validate, with_overrides
from train.model import build, describe, dscnet_kwargs
from train.tta import mirror, shifted, tta_logits


def _torch_reference():
    """``train/scripts/torch_reference.py`` as a module (a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "train/scripts/torch_reference.py"
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return ref


def test_default_plan_is_unchanged_and_8x8_layout_dilates_after_downsampling():
    assert [tuple(b) for b in block_plan(4, 2)] == [
        (4, 4, 1, 1), (4, 4, 1, 1), (4, 8, 2, 1), (8, 8, 1, 2), (8, 16, 1, 2), (16, 16, 1, 4)]
    plan = block_plan((4, 8, 12), 3, dilations=(1, 2), strides=(1, 2, 2))
    # A strided first block never dilates; the stage then takes the dilations in turn.
    assert [(b.stride, b.dilation) for b in plan[6:]] == [(2, 1), (1, 2), (1, 1)]
    # Built abstractly: every check here is on shapes (jax.random would compile one initializer per
    # parameter shape, ~10 s of this test under load).
    model = nnx.eval_shape(lambda: DSCNet(10, widths=(4, 8, 12), strides=(1, 2, 2), dilations=(1, 2),
                                          rngs=nnx.Rngs(0)))
    model.eval()
    assert model.head.in_features == 12 and model.width == 4

    def last_map(model: DSCNet, x: jax.Array) -> jax.Array:
        h = model.stem(model.normalize(x))
        for block in model.blocks:
            h = block(h)
        return h

    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    assert nnx.eval_shape(last_map, model, x).shape == (1, 8, 8, 12)  # shapes only: no compute


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"width": 8, "widths": (4, 8, 12)}, "width=8 contradicts widths"),
    ({"widths": (4, 8)}, "widths must hold the 3"),
    ({"widths": (4, 0, 8)}, "widths"),
    ({"strides": (1, 2)}, "strides must hold one stride per stage"),
    ({"dilations": ()}, "dilations must not be empty"),
    ({"dilations": (1, -2)}, "dilations"),
    ({"kernel_size": 4}, "kernel_size must be odd"),
    ({"kernel_size": 0}, "kernel_size"),
    ({"depth": (2, 2)}, r"depth must be one int or one per stage \(3\), got \(2, 2\)"),
    ({"depth": (2, 0, 2)}, "depth must be >= 1, got 0"),
    ({"stem_width": 0}, "stem_width must be >= 1, got 0"),
])
def test_bad_stage_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSCNet(10, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"model": {"widths": [8, 16]}}, "--widths must be 3 positive ints"),
    ({"model": {"widths": [8, 16, 32], "width": 16}}, "--width 16 contradicts --widths"),
    ({"model": {"strides": [1, 2]}}, "--strides must be 3"),
    ({"model": {"dilations": []}}, "--dilations one or more"),
    ({"data": {"task": "adding"}, "model": {"model": "tcn", "channels": [4]}, "run": {"tta": "flip"}},
     "--tta flip is for --task cifar10"),
    ({"data": {"train_sizes": [4, 32]}}, "--train-sizes must be ints >= 8"),
    ({"data": {"train_sizes": [16, 32], "task": "adding"}, "model": {"model": "tcn", "channels": [4]}},
     "--train-sizes is for --task cifar10"),
    ({"model": {"stem_init": "whiten", "model": "torchvision:mobilenet_v2"}},
     "--stem-init whiten is for a fresh --model dscnet"),
    ({"model": {"stem_init": "whiten", "init_from": "runs/x"}}, "--stem-init whiten is for a fresh --model dscnet"),
    ({"model": {"depths": [2, 2]}}, "--depths must be 3 positive ints, got"),
    ({"model": {"depths": [2, 2, 2], "depth": 3}}, "--depth 3 contradicts --depths"),
    ({"model": {"depths": [2, 2, 2], "model": "torchvision:mobilenet_v2"}}, "--depths is for DSCNet"),
    ({"model": {"stem_width": -1}}, "--stem-width must be >= 0"),
    ({"model": {"stem_width": 8, "model": "torchvision:mobilenet_v2"}}, "--stem-width is for DSCNet"),
    ({"model": {"dw_kernel_size": 4}}, "--dw-kernel-size must be a positive odd int, got 4"),
    ({"model": {"dw_kernel_size": 5, "model": "torchvision:mobilenet_v2"}}, "--dw-kernel-size is for DSCNet"),
    ({"model": {"activation": "silu", "model": "torchvision:mobilenet_v2"}}, "--activation is for DSCNet"),
    ({"model": {"se_ratio": 1.5}}, r"--se-ratio must be in \[0, 1\] \(0: no squeeze-and-excitation\), got 1.5"),
    ({"model": {"se_ratio": 0.25, "model": "torchvision:mobilenet_v2"}}, "--se-ratio is for DSCNet"),
])
def test_recipe_flags_are_validated(overrides, match):
    cfg = PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in overrides.items()})
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_cifar10_cpu_preset_uses_dilation_after_downsampling_to_8x8():
    cfg = validate(PRESETS["cifar10-cpu"])
    model = nnx.eval_shape(lambda: build(cfg.model, 0))  # the layout only: no init compile
    assert any(b.kernel_dilation[0] > 1 for b in model.blocks)
    assert "strides 2-2-1" in describe(cfg.model) and cfg.run.tta != "none"
    assert describe(PRESETS["default"].model) == "dscnet w32 d2"
    assert describe(with_overrides(PRESETS["default"], {"dw_kernel_size": 5}).model) == "dscnet w32 d2 k5"
    k = with_overrides(cfg, {"dw_kernel_size": 7}).model
    assert [b.depthwise.kernel_size for b in nnx.eval_shape(lambda: build(k, 0)).blocks] == [(7, 7)] * 6
    assert with_overrides(cfg, {"widths": [8, 16, 24]}).model.widths == [8, 16, 24]


def test_depths_and_stem_width_shape_the_net():
    cfg = with_overrides(PRESETS["cifar10-cpu"], {"depths": [3, 1, 2]}).model
    assert "d3-1-2" in describe(cfg)
    model = nnx.eval_shape(lambda: build(cfg, 0))
    w1, w2, w3 = cfg.widths
    assert [b.pointwise.out_features for b in model.blocks] == [w1] * 3 + [w2] + [w3] * 2
    assert [b.strides for b in model.blocks] == [(2, 2), (1, 1), (1, 1), (2, 2), (1, 1), (1, 1)]
    assert model.depth == (3, 1, 2)
    narrow = nnx.eval_shape(lambda: build(with_overrides(PRESETS["cifar10-cpu"], {"stem_width": 16}).model, 0))
    assert narrow.stem.conv.out_features == narrow.blocks[0].in_features == 16
    assert narrow.blocks[0].out_features == w1 and not narrow.blocks[0].residual
    assert "stem16" in describe(with_overrides(PRESETS["cifar10-cpu"], {"stem_width": 16}).model)


def test_activation_flag_builds_the_same_net_in_both_frameworks():
    """``--activation`` reaches every BatchNorm of the JAX net and of the PyTorch reference's twin; its
    choices are names both frameworks know; relu (the default) writes no config key."""
    import typing

    from jaxdsc.activations import ACTIVATIONS
    from torch_bridge.nn import TORCH_ACTIVATIONS
    from train.config import ModelConfig

    choices = set(typing.get_args(typing.get_type_hints(ModelConfig)["activation"]))
    assert choices <= set(ACTIVATIONS) & set(TORCH_ACTIVATIONS)
    cfg = with_overrides(PRESETS["cifar10-cpu"], {"activation": "silu"}).model
    assert describe(cfg).endswith("stem32 silu dil 2-4")
    model = nnx.eval_shape(lambda: build(cfg, 0))
    assert model.activation == model.stem.activation == "silu"
    assert {b.activation for b in model.blocks} == {"silu"}
    ref = _torch_reference()
    twin = ref.build_model(with_overrides(PRESETS["tiny"], {"activation": "gelu"}).model)
    assert twin.activation == "gelu"
    assert "activation" not in dscnet_kwargs(PRESETS["cifar10-cpu"].model)


def test_se_ratio_flag_builds_the_same_net_in_both_frameworks():
    """``--se-ratio`` puts a squeeze-and-excitation of that fraction in every separable block of the JAX
    net and of the PyTorch reference's twin; 0 (the default) adds none and writes no config key."""
    cfg = with_overrides(PRESETS["cifar10-cpu"], {"se_ratio": 0.25}).model
    assert describe(cfg).endswith("stem32 se0.25 dil 2-4")
    model = nnx.eval_shape(lambda: build(cfg, 0))
    # Squeezes of a quarter of each block's depthwise channels (the block's input).
    assert [b.se.rd_features for b in model.blocks] == [8, 32, 32, 64, 64, 96]
    ref = _torch_reference()
    twin = ref.build_model(with_overrides(PRESETS["tiny"], {"se_ratio": 0.5}).model)
    assert {b.se.rd_channels * 2 for b in twin.blocks} == {b.in_channels for b in twin.blocks}
    assert "se_ratio" not in dscnet_kwargs(PRESETS["cifar10-cpu"].model)
    assert all(b.se is None for b in nnx.eval_shape(lambda: build(PRESETS["cifar10-cpu"].model, 0)).blocks)


def test_depths_and_widths_flags_replace_the_presets_depth_and_width():
    """``tiny`` sets depth 1 and width 8: ``--depths`` / ``--widths`` alone replace them; both a
    ``--depth`` and a ``--depths`` given contradict."""
    from train.cli import parse

    cfg, _ = parse(["--preset", "tiny", "--depths", "1", "2", "1", "--widths", "4", "8", "12"])
    assert (cfg.model.depths, cfg.model.widths) == ([1, 2, 1], [4, 8, 12])
    assert describe(cfg.model).startswith("dscnet widths 4-8-12") and "d1-2-1" in describe(cfg.model)
    with pytest.raises(ConfigError, match="--depth 3 contradicts --depths"):
        validate(with_overrides(PRESETS["tiny"], {"depths": [1, 2, 1], "depth": 3}))
    with pytest.raises(TypeError, match="depth must be an int, got '2'"):
        DSCNet(10, depth=(2, "2", 2), rngs=nnx.Rngs(0))


def test_shifted_views_move_the_image_one_pixel_with_reflection():
    x = jnp.arange(2 * 4 * 5 * 1, dtype=jnp.float32).reshape(2, 4, 5, 1)
    up_left, down_right = shifted(x)
    # Up-left view: row/col 0 are the reflection of row/col 1, then the image moves down-right by one.
    np.testing.assert_array_equal(up_left[:, 1:, 1:], x[:, :-1, :-1])
    np.testing.assert_array_equal(up_left[:, 0, 1:], x[:, 1, :-1])
    np.testing.assert_array_equal(down_right[:, :-1, :-1], x[:, 1:, 1:])
    np.testing.assert_array_equal(mirror(mirror(x)), x)
    assert up_left.shape == down_right.shape == x.shape


def test_tta_averages_the_views_with_airbench_weights():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((3, 6, 6, 2), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((6 * 6 * 2, 4), dtype=np.float32))
    apply = lambda v: v.reshape(v.shape[0], -1) @ w  # noqa: E731 - a linear "model": sees position and side
    logits, plain = tta_logits(apply, x, "none")
    np.testing.assert_array_equal(logits, plain)
    np.testing.assert_array_equal(plain, apply(x))
    flip, plain = tta_logits(apply, x, "flip")
    np.testing.assert_allclose(flip, 0.5 * (apply(x) + apply(mirror(x))), rtol=1e-6)
    both, _ = tta_logits(apply, x, "flip-shift")
    a, b = shifted(x)
    pair = lambda v: 0.5 * (apply(v) + apply(mirror(v)))  # noqa: E731
    np.testing.assert_allclose(both, 0.5 * pair(x) + 0.25 * (pair(a) + pair(b)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tta mode"):
        tta_logits(apply, x, "rotate")


def test_eval_step_counts_plain_and_augmented_predictions():
    model = DSCNet(10, width=4, depth=1, rngs=nnx.Rngs(0))
    _, graph_eval, params, stats, consts = steps.split_model(model)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    state = steps.create_state(params, stats, consts, optax.sgd(0.1), mesh, seed=0, ema=False)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, 8).astype(np.int32)),
             "mask": jnp.asarray([True] * 6 + [False] * 2)}
    plain = jax.jit(steps.make_eval_step(graph_eval))(state, batch)
    out = jax.jit(steps.make_eval_step(graph_eval, tta="flip-shift"))(state, batch)
    assert "correct_plain" not in plain and float(out["count"]) == 6
    assert float(out["correct_plain"]) == float(plain["correct"])
    # jitted: eagerly, the 6 views' forward passes dispatch (and compile) op by op
    logits, _ = jax.jit(lambda s, x: steps.eval_logits_tta(graph_eval, s, x, lambda v: v, "flip-shift"))(
        state, batch["image"])
    expect = np.sum((np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])) * np.asarray(batch["mask"]))
    assert float(out["correct"]) == expect


@pytest.mark.parametrize("mode", ["flip", "flip-shift"])
def test_torch_reference_tta_is_the_same_function(mode):
    """The PyTorch reference's TTA (train/scripts/torch_reference.py) equals train.tta on twin models:
    float32 with different conv algorithms, 1e-5 of max |logit| is a few ulps of the sums."""
    import torch

    import torch_bridge

    ref = _torch_reference()
    model = DSCNet(10, widths=(4, 8, 12), strides=(1, 2, 2), dilations=(1, 2), rngs=nnx.Rngs(0))
    model.eval()
    twin = torch_bridge.to_torch(model).eval()
    x = np.random.default_rng(1).random((4, 32, 32, 3), dtype=np.float32)
    got, _ = tta_logits(model, jnp.asarray(x), mode)
    with torch.no_grad():
        want = ref.tta_logits(twin, torch.from_numpy(x).permute(0, 3, 1, 2), mode).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_torch_reference_autocast_step():
    """``--precision`` other than float32 runs the PyTorch reference under bfloat16 autocast: its first
    loss moves off the float32 one by bfloat16 rounding (> 1e-5), not by more (< 2e-2 relative)."""
    import copy

    import torch

    import torch_bridge

    ref = _torch_reference()
    twin = torch_bridge.to_torch(DSCNet(10, widths=(8, 16, 24), strides=(1, 2, 2), rngs=nnx.Rngs(0)))
    o = PRESETS["cifar10-cpu"].optim
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    y = torch.arange(8) % 10
    losses = [float(ref.TorchTrainStep(copy.deepcopy(twin), o, 10, crop_padding=0, flip=False,
                                       autocast=autocast)(x.float() / 255, y, 0)) for autocast in (False, True)]
    assert np.isfinite(losses).all()
    assert 1e-5 < abs(losses[1] - losses[0]) < 2e-2 * losses[0], losses


def test_dscnet_files_from_before_kernel_size_load_as_3x3():
    """torch_bridge files written before DSCNet took ``kernel_size`` and ``stem_width`` have no such
    keys: 3x3 taps, a stem as wide as the first stage."""
    from torch_bridge.spec import spec_for_name

    kwargs = spec_for_name("DSCNet").jax_kwargs({"num_classes": 3, "width": 4, "depth": 1})
    assert "kernel_size" not in kwargs
    model = nnx.eval_shape(lambda: DSCNet(**kwargs, rngs=nnx.Rngs(0)))
    assert {b.depthwise.kernel_size for b in model.blocks} == {(3, 3)}
    assert model.stem_width == model.stem.conv.out_features == 4
    assert spec_for_name("DSCNet").jax_kwargs({"kernel_size": 5}) == {"kernel_size": 5}
    assert "stem_width" not in dscnet_kwargs(PRESETS["default"].model)  # the default stem writes no new key
