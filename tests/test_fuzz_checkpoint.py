"""Fuzzing the checkpoint readers: the only failure is CheckpointError (a ValueError).

Random bytes, truncations and byte flips of a valid file go through
``torch_bridge.read`` / ``load`` / ``read_state_dict``. A flip may also leave
the file valid (e.g. whitespace in the header's padding); then the loaded
tensors must equal the original ones bit for bit: corruption is never
silently accepted.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdsc
import torch_bridge
from torch_bridge import CheckpointError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> tuple[bytes, dict[str, np.ndarray]]:
    module = jaxdsc.SeparableConv(3, 4, 3, mid_norm="batch", mid_activation="relu", rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("fuzz") / "ok.safetensors"
    torch_bridge.save(module, path)
    return path.read_bytes(), torch_bridge.read(path).tensors


def _load_all(path) -> dict[str, np.ndarray] | None:
    """Run every reader; return the tensors if the file is accepted."""
    ckpt = torch_bridge.read(path)
    torch_bridge.load(path, framework="jax")
    torch_bridge.load(path, framework="torch")
    torch_bridge.read_state_dict(path)
    return ckpt.tensors


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_checkpoint_error(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"random\.safetensors"):
        _load_all(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncations_raise_checkpoint_error(tmp_path, valid_file, cut):
    blob, _ = valid_file
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[: cut % len(blob)])
    with pytest.raises(CheckpointError):
        _load_all(path)


@FUZZ
@given(position=st.integers(min_value=0, max_value=10**9), bit=st.integers(0, 7))
def test_bit_flips_are_rejected_or_harmless(tmp_path, valid_file, position, bit):
    blob, original = valid_file
    flipped = bytearray(blob)
    flipped[position % len(blob)] ^= 1 << bit
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(flipped))
    try:
        tensors = _load_all(path)
    except CheckpointError:
        return
    assert tensors is not None and set(tensors) == set(original)
    for key, value in original.items():
        assert tensors[key].dtype == value.dtype
        assert np.array_equal(tensors[key], value), key


def test_flip_in_data_region_names_the_tensor(tmp_path, valid_file):
    blob, _ = valid_file
    flipped = bytearray(blob)
    flipped[-1] ^= 0x01  # last byte belongs to the last tensor in the data region
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"tensor '.*' fails its SHA-256 check"):
        torch_bridge.read(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_torch_files_raise_checkpoint_error(tmp_path, suffix, data):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        torch_bridge.read_state_dict(path)
