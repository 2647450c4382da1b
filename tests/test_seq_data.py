"""Sequence tasks (train/seq_data.py) and their metrics (train/seq_metrics.py).

Generators: shapes, the paper's structure, seeded reproducibility, disjoint
train/test. Music: tiny ``.mat`` files of the real structure (scipy.io.savemat).
Metrics: against values computed by hand (tolerance 1e-6 relative: float32
arithmetic on a handful of terms).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.io

from train import seq_data, seq_metrics
from train.data import DataError


def test_adding_structure_and_seed():
    x, y = seq_data.adding(64, 50, seed=3)
    assert x.shape == (64, 50, 2) and y.shape == (64,) and x.dtype == np.float32
    assert ((x[..., 0] >= 0) & (x[..., 0] < 1)).all()
    assert (x[..., 1].sum(axis=1) == 2).all()  # two distinct markers
    np.testing.assert_allclose(y, (x[..., 0] * x[..., 1]).sum(axis=1), rtol=1e-6)
    x2, y2 = seq_data.adding(64, 50, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, seq_data.adding(64, 50, seed=4)[0])


def test_adding_positions_uniform():
    x, _ = seq_data.adding(4000, 5, seed=0)
    counts = x[..., 1].sum(axis=0)  # each position marked with probability 2/5
    assert np.all(np.abs(counts / 4000 - 0.4) < 0.04)


def test_copy_structure():
    x, y = seq_data.copy_memory(5, blank=30, memory=10, seed=1)
    assert x.shape == (5, 50, 1) and y.shape == (5, 50) and y.dtype == np.int32
    digits = x[:, :10, 0]
    assert ((digits >= 1) & (digits <= 8)).all()
    assert (x[:, 10:39, 0] == 0).all() and (x[:, 39:, 0] == 9).all()  # T-1 blanks, m+1 markers
    assert (y[:, :40] == 0).all()
    np.testing.assert_array_equal(y[:, 40:], digits.astype(np.int32))


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_generate_disjoint_and_reproducible(task):
    a = seq_data.generate(task, n_train=200, n_test=50, length=20, seed=7)
    b = seq_data.generate(task, n_train=200, n_test=50, length=20, seed=7)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert a.test_x.shape[0] == 50
    seq_data.assert_disjoint(a.train_x, a.test_x)
    with pytest.raises(DataError, match="both"):
        seq_data.assert_disjoint(a.train_x, a.train_x[3:5])


def test_test_examples_repeating_training_ones_are_dropped(monkeypatch):
    """A generator with only 3 distinct examples: every test draw repeats a training one."""

    def tiny(n, length, *, seed):
        v = np.random.default_rng(seed).integers(0, 3, n).astype(np.float32)
        return np.broadcast_to(v[:, None, None], (n, length, 2)).copy(), v

    monkeypatch.setattr(seq_data, "adding", tiny)
    with pytest.raises(DataError, match="differ from the training set"):
        seq_data.generate("adding", n_train=30, n_test=5, length=4, seed=0)


def _write_mat(path, splits):
    cells = {}
    for name, seqs in splits.items():
        arr = np.empty((1, len(seqs)), dtype=object)
        for i, s in enumerate(seqs):
            arr[0, i] = s.astype(np.uint8)
        cells[f"{name}data"] = arr
    scipy.io.savemat(str(path), cells)


def _roll(t, seed):
    return (np.random.default_rng(seed).random((t, 88)) < 0.1).astype(np.uint8)


def test_music_read_and_pad(tmp_path):
    splits = {"train": [_roll(5, 0), _roll(3, 1)], "valid": [_roll(4, 2)], "test": [_roll(6, 3)]}
    _write_mat(tmp_path / "JSB_Chorales.mat", splits)
    data = seq_data.load_music("music-jsb", tmp_path)
    assert len(data.train) == 2 and data.test[0].shape == (6, 88) and data.train[0].dtype == np.float32
    np.testing.assert_array_equal(data.train[1], splits["train"][1])
    x, y, mask = seq_data.pad_batch(data.train)
    assert x.shape == (2, 4, 88)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(x[1, :2], splits["train"][1][:2])
    np.testing.assert_array_equal(y[1, :2], splits["train"][1][1:])
    assert (x[1, 2:] == 0).all()


def test_music_bad_files(tmp_path):
    _write_mat(tmp_path / "a.mat", {"train": [_roll(5, 0)], "valid": [_roll(4, 2)]})
    with pytest.raises(DataError, match="testdata"):
        seq_data.read_music(tmp_path / "a.mat")
    _write_mat(tmp_path / "b.mat", {"train": [np.ones((5, 87))], "valid": [_roll(4, 2)], "test": [_roll(4, 2)]})
    with pytest.raises(DataError, match="shape"):
        seq_data.read_music(tmp_path / "b.mat")
    with pytest.raises(DataError, match="no such file"):
        seq_data.load_music("music-nottingham", tmp_path)


def test_metrics_hand_computed():
    assert float(seq_metrics.mse(np.array([1.0, 2.0]), np.array([0.0, 4.0]))) == pytest.approx(2.5)
    logits = np.log(np.array([[[1.0, 3.0]]], np.float32))  # softmax = [0.25, 0.75]
    ce = float(seq_metrics.cross_entropy(logits, np.array([[1]])))
    assert ce == pytest.approx(-math.log(0.75), rel=1e-6)
    # two keys with p = sigmoid(z); one masked-out step must not count
    z = np.zeros((1, 2, 88), np.float32)
    z[0, 0, 0], z[0, 0, 1] = math.log(3.0), -math.log(3.0)  # p = 0.75, 0.25
    y = np.zeros((1, 2, 88), np.float32)
    y[0, 0, 0] = 1.0
    y[0, 1] = 1.0
    total, count = seq_metrics.bernoulli_nll_sum(z, y, np.array([[1.0, 0.0]]))
    expect = -math.log(0.75) - math.log(0.75) + 86 * math.log(2.0)
    assert float(count) == 1.0
    assert float(total) == pytest.approx(expect, rel=1e-6)
    assert float(seq_metrics.music_nll(z, y, np.array([[1.0, 0.0]]))) == pytest.approx(expect, rel=1e-6)


def test_constant_one_predictor_adding():
    _, y = seq_data.adding(20000, 10, seed=0)
    assert float(seq_metrics.mse(np.ones_like(y), y)) == pytest.approx(1 / 6, rel=0.03)
