"""Cutout (``--cutout N``, train/augment.py): the zeroed square, its independence from the crop and
flip draws, the train step and the run that use it, and the PyTorch reference's twin of it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import augment, cli, optim, steps
from train.config import PRESETS, ConfigError, ModelConfig, OptimConfig, validate, with_overrides
from train.model import build
from train.testing import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
H = W = 32


def _check_squares(zero: np.ndarray, size: int) -> np.ndarray:
    """Assert each image's zeroed pixels ``zero (N, H, W)`` form one square of side ``size`` clipped
    at the border and holding its centre; return the centres ``(N, 2)``."""
    centres = []
    for z in zero:
        rows, cols = np.flatnonzero(z.any(1)), np.flatnonzero(z.any(0))
        assert rows.size and cols.size, "every image loses a square (its centre is inside the image)"
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        box = np.zeros_like(z)
        box[r0:r1, c0:c1] = True
        np.testing.assert_array_equal(z, box)  # one axis-aligned rectangle, nothing else
        centre = []
        for lo, hi, extent in ((r0, r1, H), (c0, c1, W)):
            # unclipped: exactly `size` long; clipped: it touches that border and keeps the centre's half
            assert hi - lo == size or (lo == 0 and hi >= size - size // 2) or (hi == extent and hi - lo > size // 2)
            centre.append(hi - size + size // 2 if lo == 0 else lo + size // 2)
        centres.append(centre)
    return np.asarray(centres)


@pytest.mark.parametrize("size", [8, 7])
def test_cutout_zeroes_one_clipped_square_at_a_uniform_centre(size):
    x = jnp.full((512, H, W, 3), 255, jnp.uint8)
    out = np.asarray(augment.augment(x, jax.random.key(0), padding=0, flip=False, cutout=size))
    assert set(np.unique(out)) == {0.0, 1.0}
    zero = out == 0
    assert (zero.all(-1) == zero.any(-1)).all()  # every channel of a pixel alike
    centres = _check_squares(zero[..., 0], size)
    # Centres where the square is whole are exact; uniform over the 32 rows: every one of the
    # interior rows occurs among 512 draws (a given row is missed with probability (31/32)^512 < 1e-7).
    interior = range(size // 2, H - (size - size // 2) + 1)
    assert set(interior) <= set(centres[:, 0]) and set(interior) <= set(centres[:, 1])
    # A fresh key gives fresh squares.
    again = np.asarray(augment.augment(x, jax.random.key(1), padding=0, flip=False, cutout=size))
    assert not np.array_equal(out, again)


def test_cutout_keeps_the_crops_and_flips_of_the_same_key():
    """Turning cutout on changes only the zeroed squares: a run's crops and flips stay the same."""
    x = jnp.asarray(np.random.default_rng(0).integers(1, 256, (64, H, W, 3), dtype=np.uint8))
    key = jax.random.key(5)
    plain = np.asarray(augment.augment(x, key, padding=2, flip=True))
    cut = np.asarray(augment.augment(x, key, padding=2, flip=True, cutout=8))
    np.testing.assert_array_equal(plain, np.asarray(augment.augment(x, key, padding=2, flip=True, cutout=0)))
    changed = (cut != plain).any(-1)
    assert (cut[changed] == 0).all()
    # The zeroed set is the square; padded zeros of the crop may lie inside it, so check the square
    # with an image of no zeros and the same key.
    ones = np.asarray(augment.augment(jnp.full_like(x, 255), key, padding=0, flip=False, cutout=8))
    _check_squares(ones[..., 0] == 0, 8)
    assert changed.any() and changed.mean() <= 64 / (H * W)


def test_train_step_applies_cutout():
    """A square bigger than twice the image zeroes it all: the step's loss is then the loss of an
    all-zero batch without cutout (exact: the same program on the same input)."""
    graph_train, _, params, stats, consts = steps.split_model(build(ModelConfig(width=4, depth=1), 0))
    cfg = OptimConfig(lr=0.1, epochs=1)
    tx, lr = optim.make_optimizer(cfg, params, 10)

    def loss(images: np.ndarray, cutout: int) -> float:
        fn = steps.make_train_step(graph_train, tx, lr, num_classes=10, label_smoothing=0.1, crop_padding=0,
                                   flip=False, ema_decay=0.0, cutout=cutout)
        state = steps.init_state(params, stats, consts, tx=tx, seed=0, ema=False)
        _, metrics = jax.jit(fn)(state, {"image": jnp.asarray(images), "label": jnp.arange(8, dtype=jnp.int32)})
        return float(metrics["loss"])

    images = np.random.default_rng(0).integers(1, 256, (8, H, W, 3), dtype=np.uint8)
    assert loss(images, 2 * H) == loss(np.zeros_like(images), 0)
    assert loss(images, 2 * H) != loss(images, 0)


def test_run_passes_cutout_to_the_step(tmp_path, monkeypatch):
    seen: list[int] = []
    real = steps.augment

    def spy(*args, **kwargs):
        seen.append(kwargs["cutout"])
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "augment", spy)
    data = write_cifar10(tmp_path / "cifar", 64, 32)
    assert cli.main(["--preset", "tiny", "--data-dir", str(data), "--workdir", str(tmp_path / "run"),
                     "--no-progress", "--no-plot", "--train-limit", "0", "--test-limit", "0", "--batch-size", "32",
                     "--epochs", "1", "--checkpoint-every", "0", "--eval-batch-size", "32", "--cutout", "12"]) == 0
    assert seen == [12]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["cutout"] == 12


@pytest.mark.parametrize(("preset", "cutout", "match"), [
    ("tiny", -1, "--cutout must be >= 0, got -1"),
    ("shapes-seg", 8, "--cutout is for --task cifar10, got --task shapes-seg"),
    ("adding", 8, "--cutout is for --task cifar10, got --task adding"),
])
def test_bad_cutout_is_refused(preset, cutout, match):
    with pytest.raises(ConfigError, match=match):
        validate(with_overrides(PRESETS[preset], {"cutout": cutout}))


def test_torch_reference_cuts_the_same_squares():
    """The PyTorch reference's cutout follows the same rule (its draws come from torch's generator)."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("torch_reference", ROOT / "train/scripts/torch_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    x = torch.full((512, 3, H, W), 255, dtype=torch.uint8)
    for size in (8, 7):
        out = ref.augment(x, torch.Generator().manual_seed(0), 0, False, size).numpy()
        zero = out == 0
        assert (zero.all(1) == zero.any(1)).all()
        centres = _check_squares(zero[:, 0], size)
        interior = range(size // 2, H - (size - size // 2) + 1)
        assert set(interior) <= set(centres[:, 0]) and set(interior) <= set(centres[:, 1])
