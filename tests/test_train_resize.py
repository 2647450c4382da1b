"""Progressive resizing (``--train-sizes``, train/resize.py): the phase of a step, the resize itself,
the step that uses it, the PyTorch reference's twin of it, and a run that resumes across a phase."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import persistent_compile_cache
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdsc.models import DSCNet
from train import cli, faults, steps
from train.checkpointing import read_arrays
from train.config import PRESETS
from train.resize import resize, size_at
from train.testing import write_cifar10

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(8, 64), min_size=1, max_size=5), total=st.integers(1, 400))
def test_phases_are_equal_shares_in_order(sizes, total):
    got = [size_at(sizes, k, total) for k in range(total)]
    n = len(sizes)
    # Phase i holds steps [ceil(i T / n), ceil((i+1) T / n)): floor or ceil of T / n steps, in order.
    for i, size in enumerate(sizes):
        lo, hi = -(-i * total // n), -(-(i + 1) * total // n)
        assert all(s == size for s in got[lo:hi])
        assert hi - lo in (total // n, -(-total // n))
    assert got[0] == sizes[0]
    assert got[-1] == sizes[-1] or total < n  # fewer steps than phases: the last ones get none


@pytest.mark.parametrize(("args", "match"), [
    (((), 0, 4), "sizes must not be empty"),
    (((16,), 4, 4), "step must be in"),
    (((16,), -1, 4), "step must be in"),
    (((16,), 0, 0), "step must be in"),
])
def test_size_at_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        size_at(*args)


@pytest.mark.parametrize("size", [16, 24, 28, 40])
def test_resize_is_pytorchs_antialiased_bilinear(size):
    """Down- and upscaling equal ``F.interpolate(bilinear, antialias=True)``: float32 sums of up to 8
    taps in another order, 1e-6 absolute on values in [0, 1] (observed 1.8e-7)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(size).random((3, 32, 32, 3), dtype=np.float32)
    got = np.asarray(resize(jnp.asarray(x), size))
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(size, size),
                                           mode="bilinear", antialias=True, align_corners=False)
    assert got.shape == (3, size, size, 3)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


def test_resize_at_the_images_own_size_is_the_identity():
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32))
    assert resize(x, 32) is x


def _tiny_step(image_size: int | None, seen: list[tuple[int, ...]]):
    model = DSCNet(10, widths=(4, 8, 8), strides=(1, 2, 2), dilations=(1, 2), rngs=nnx.Rngs(0))
    graph_train, _, params, stats, consts = steps.split_model(model)
    tx = optax.sgd(0.1)
    state = steps.init_state(params, stats, consts, tx, seed=0, ema=False)

    def record(x):
        seen.append(x.shape)
        return x

    fn = steps.make_train_step(graph_train, tx, lambda _: 0.1, num_classes=10, label_smoothing=0.0, crop_padding=0,
                               flip=False, ema_decay=0.0, input_fn=record, image_size=image_size)
    return model, state, fn


def test_torch_reference_resizes_the_same_way():
    """The JAX step feeds the model the phase's size, and the PyTorch reference's step in a 16x16
    phase has its loss (twin weights, no augmentation); float32 with other conv algorithms: 1e-5 on
    a loss of about 2.3."""
    torch = pytest.importorskip("torch")
    import torch_bridge

    spec = importlib.util.spec_from_file_location("torch_reference", ROOT / "train/scripts/torch_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    seen: list[tuple[int, ...]] = []
    model, state, fn = _tiny_step(16, seen)
    x, y = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.arange(8) % 10
    _, metrics = jax.jit(fn)(state, {"image": jnp.asarray(x), "label": jnp.asarray(y, jnp.int32)})
    o = dataclasses.replace(PRESETS["tiny"].optim, epochs=2, label_smoothing=0.0)
    twin = torch_bridge.to_torch(model).train()
    step = ref.TorchTrainStep(twin, o, 4, crop_padding=0, flip=False, layout="nchw", train_sizes=(16, 32))
    loss = step(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long(), 0)
    assert seen == [(8, 16, 16, 3)]
    assert abs(float(loss) - float(metrics["loss"])) < 1e-5


def test_run_compiles_one_step_per_size_and_resumes_across_a_phase(tmp_path, monkeypatch, capsys):
    """16x16 for the first half of the steps, then 32x32; a run stopped by SIGTERM in the first
    phase and resumed ends bit-identical to the uninterrupted one. The three runs compile the same
    programs: the second and third load them from a persistent cache."""
    data = write_cifar10(tmp_path / "cifar", 128, 64)
    with persistent_compile_cache(tmp_path / "xla-cache"):
        _whole_and_resumed(data, tmp_path, monkeypatch, capsys)


def _whole_and_resumed(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def args(name: str) -> list[str]:
        return ["--preset", "tiny", "--data-dir", str(data), "--workdir", str(tmp_path / name), "--no-progress",
                "--train-limit", "0", "--test-limit", "0", "--batch-size", "32", "--epochs", "2",
                "--checkpoint-every", "0", "--eval-batch-size", "64", "--no-plot", "--train-sizes", "16", "32"]

    assert cli.main(args("whole")) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["train_step_traces"] == 2  # 16x16 and 32x32
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("sigterm@3"))
    assert cli.main(args("resumed")) == 0
    assert "saved step 3" in capsys.readouterr().err
    monkeypatch.setattr(faults, "_FAULTS", faults.parse(""))
    assert cli.main(args("resumed")) == 0
    want, _ = read_arrays(tmp_path / "whole")
    got, ckpt = read_arrays(tmp_path / "resumed")
    assert ckpt.name == "step_000000008" and sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
