"""Patch-whitening stem initialisation (``--stem-init whiten``, train/whiten.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdsc.models import DSCNet
from jaxdsc.models.dscnet import CIFAR10_MEAN, CIFAR10_STD
from train.config import PRESETS, validate
from train.testing import synthetic
from train.whiten import EPS, patch_whitening, stem_filters, whiten_stem

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
DSCNET_NORM = (np.float32(CIFAR10_MEAN), np.float32(CIFAR10_STD))  # as DSCNet holds them


def _second_moments(responses: np.ndarray) -> np.ndarray:
    rows = responses.reshape(-1, responses.shape[-1]).astype(np.float64)
    return rows.T @ rows / len(rows)


def test_stem_conv_with_whitening_filters_decorrelates_its_patches():
    """The model's own conv (SAME padding; interior pixels, whose patches the covariance saw) with
    the filters has second moments diag(l / (l + eps)) on the images they came from: identity but
    for eps. Float32 conv sums of 27 terms: 1e-4 absolute. A transposed patch layout fails this."""
    images, _ = synthetic(64, seed=1)
    model = DSCNet(10, widths=(64, 8, 8), rngs=nnx.Rngs(0))
    model.normalize.mean.set_value(jnp.asarray(MEAN))
    model.normalize.std.set_value(jnp.asarray(STD))
    assert whiten_stem(model, images) == 54  # 27 components of 3x3x3 patches, both signs
    out = np.asarray(model.stem.conv(model.normalize(jnp.asarray(images / 255.0, jnp.float32))))[:, 1:-1, 1:-1]
    moments = _second_moments(out[..., :27])
    x = (images / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    values = np.linalg.eigvalsh(_second_moments(patches.reshape(-1, 27)))[::-1]
    np.testing.assert_allclose(moments, np.diag(values / (values + EPS)), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(out[..., 27:54], -out[..., :27])


def test_filters_beyond_the_pairs_keep_their_initialisation_and_narrow_stems_take_the_top_pairs():
    images, _ = synthetic(32, seed=2)
    model = DSCNet(10, widths=(8, 8, 8), rngs=nnx.Rngs(0))
    before = np.asarray(model.stem.conv.kernel.get_value())
    assert whiten_stem(model, images) == 8
    top = patch_whitening(images, *DSCNET_NORM, 3, 4)
    np.testing.assert_array_equal(np.asarray(model.stem.conv.kernel.get_value()), top)
    wide = DSCNet(10, widths=(60, 8, 8), rngs=nnx.Rngs(0))
    kept = np.asarray(wide.stem.conv.kernel.get_value())[..., 54:]
    whiten_stem(wide, images)
    np.testing.assert_array_equal(np.asarray(wide.stem.conv.kernel.get_value())[..., 54:], kept)
    assert not np.array_equal(before, np.asarray(model.stem.conv.kernel.get_value()))


def test_pytorch_reference_sets_the_same_stem():
    """train/scripts/torch_reference.py's whiten_stem on the twin gives the twin of the whitened model."""
    torch = pytest.importorskip("torch")
    import torch_bridge

    spec = importlib.util.spec_from_file_location("torch_reference", ROOT / "train/scripts/torch_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    images, _ = synthetic(32, seed=3)
    model = DSCNet(10, widths=(60, 8, 8), rngs=nnx.Rngs(0))
    twin = torch_bridge.to_torch(model)
    assert ref.whiten_stem(twin, images) == whiten_stem(model, images) == 54
    want = torch_bridge.to_torch(model).stem.conv.weight
    assert torch.equal(twin.stem.conv.weight, want)


@pytest.mark.parametrize(("args", "match"), [
    ((np.zeros((2, 8, 8, 3), np.float32), MEAN, STD, 3, 4), "images must be uint8"),
    ((np.zeros((2, 8, 8, 3), np.uint8), MEAN, STD, 3, 28), r"pairs must be in \[1, 27\]"),
])
def test_bad_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        patch_whitening(*args)


def test_a_stem_narrower_than_two_filters_per_component_takes_the_top_pairs():
    assert stem_filters(synthetic(8, 0)[0], MEAN, STD, 3, 5).shape == (3, 3, 3, 4)  # 5 channels: 2 pairs


@pytest.mark.parametrize("name", ["dscnet", "jaxdsc:dscnet"])  # both --model names build DSCNet
def test_trainer_starts_from_the_whitened_stem(tmp_path, name):
    from train.data import load
    from train.loop import Trainer
    from train.testing import write_cifar10

    data = write_cifar10(tmp_path / "cifar", 64, 16)
    cfg = PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(data)),
                              model=dataclasses.replace(cfg.model, model=name, stem_init="whiten"),
                              run=dataclasses.replace(cfg.run, workdir=str(tmp_path / "run")))
    trainer = Trainer(validate(cfg))
    kernel = np.asarray(trainer.state.params["stem"]["conv"]["kernel"])
    want = stem_filters(load(data).train_images, *DSCNET_NORM, 3, cfg.model.width)
    np.testing.assert_array_equal(kernel, want)
    assert trainer.init_note == f"stem: {cfg.model.width} of {cfg.model.width} filters patch-whitening"
