"""Fuzzing the checkpoint readers: the only failure is CheckpointError (a ValueError).

Random bytes, truncations and byte flips of a valid file go through
``torch_bridge.read`` / ``load`` / ``read_state_dict``. A flip may also leave
the file valid (e.g. whitespace in the header's padding); then the loaded
tensors must equal the original ones bit for bit: corruption is never
silently accepted.
"""

from __future__ import annotations

import itertools

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


# ---------------------------------------------------------------- tensor offsets, against the reference parser
def _layout_file(spans: list[tuple[int, int]], data_size: int) -> bytes:
    import json

    header = {f"t{i}": {"dtype": "U8", "shape": [max(e - s, 0)], "data_offsets": [s, e]}
              for i, (s, e) in enumerate(spans)}
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(range(256)) * (data_size // 256) + bytes(data_size % 256)


def _reference_accepts(blob: bytes) -> bool:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        load(blob)
    except SafetensorError:
        return False
    return True


@FUZZ
@given(spans=st.lists(st.tuples(st.integers(0, 24), st.integers(0, 24)), min_size=0, max_size=5),
       extra=st.integers(-3, 3), tile=st.booleans())
def test_offsets_accepted_exactly_when_the_reference_parser_accepts_them(tmp_path, spans, extra, tile):
    # Half of the examples are valid tilings (in a shuffled key order), the others random spans:
    # overlaps, gaps, aliases, zero-size tensors and trailing bytes.
    if tile:
        sizes = [abs(e - s) for s, e in spans]
        starts = np.cumsum([0, *sizes])
        spans = [(int(a), int(b)) for a, b in itertools.pairwise(starts)][::-1]
        extra = 0 if extra < 2 else extra  # mostly exact, sometimes trailing bytes
    size = max([0, *(max(s, e) for s, e in spans)]) + extra
    if size < 0:
        return
    blob = _layout_file(spans, size)
    path = tmp_path / "layout.safetensors"
    path.write_bytes(blob)
    try:
        tensors, _ = torch_bridge.checkpoint.read_safetensors(path)
        ours = True
    except CheckpointError:
        ours = False
    assert ours == _reference_accepts(blob), (spans, size)
    if ours:  # and then the same bytes for each tensor
        from safetensors.numpy import load

        ref = load(blob)
        assert tensors.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(tensors[k], ref[k])


@pytest.mark.parametrize(("spans", "size", "match"), [
    ([(0, 4), (2, 6)], 6, r"'t1' at data offsets \[2, 6\] overlaps the previous tensor"),
    ([(0, 4), (5, 9)], 9, r"'t1' at data offsets \[5, 9\] leaves a gap of 1 bytes"),
    ([(0, 4), (0, 4)], 4, r"overlaps the previous tensor"),
    ([(0, 4), (4, 8)], 10, r"the tensors cover 8 of the 10 bytes of the data region \(2 bytes"),
])
def test_offset_errors_name_the_tensor_and_the_problem(tmp_path, spans, size, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_layout_file(spans, size))
    with pytest.raises(CheckpointError, match=match):
        torch_bridge.checkpoint.read_safetensors(path)
