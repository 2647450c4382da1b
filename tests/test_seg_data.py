"""train.seg_data (shapes-seg): determinism, a fixed test split disjoint from train, labels."""

from __future__ import annotations

import numpy as np
import pytest

from train import seg_data


@pytest.fixture(scope="module")
def data() -> seg_data.ShapesSeg:
    return seg_data.load(train=24, test=12, seed=3, size=64)


def test_shapes_dtypes_and_labels(data):
    assert data.train_images.shape == (24, 64, 64, 3) and data.train_images.dtype == np.uint8
    assert data.test_labels.shape == (12, 64, 64) and data.test_labels.dtype == np.uint8
    values = set(np.unique(np.concatenate([data.train_labels.ravel(), data.test_labels.ravel()])))
    assert values == {*range(seg_data.NUM_CLASSES), seg_data.IGNORE_INDEX}
    for labels in (data.train_labels, data.test_labels):
        ignore = labels == seg_data.IGNORE_INDEX
        assert 0.01 < ignore.mean() < 0.2
        # Every ignored pixel borders another label; no two different classes touch directly.
        for axis in (1, 2):
            a, b = np.moveaxis(labels, axis, 0)[:-1], np.moveaxis(labels, axis, 0)[1:]
            assert not np.any((a != b) & (a != 255) & (b != 255))
    assert data.train_images.std() > 40  # textured, not flat


def test_deterministic_prefix_and_fixed_disjoint_test_split(data):
    again = seg_data.generate(5, split="train", seed=3, size=64, start=10)
    np.testing.assert_array_equal(again[0], data.train_images[10:15])
    np.testing.assert_array_equal(again[1], data.train_labels[10:15])
    other_seed = seg_data.load(train=4, test=12, seed=4, size=64)
    np.testing.assert_array_equal(other_seed.test_images, data.test_images)  # fixed test split
    assert not np.array_equal(other_seed.train_images, data.train_images[:4])
    test_hashes = {img.tobytes() for img in data.test_images}
    assert len(test_hashes) == 12
    for split in (data.train_images, other_seed.train_images):
        assert not test_hashes & {img.tobytes() for img in split}


def test_errors():
    with pytest.raises(ValueError, match="split"):
        seg_data.generate(1, split="val")
    with pytest.raises(ValueError, match="size"):
        seg_data.generate(1, size=8)
    with pytest.raises(ValueError, match="n must"):
        seg_data.generate(-1)
