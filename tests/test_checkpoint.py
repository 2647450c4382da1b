"""Checkpoint files: atomic writes, and a CheckpointError naming the file for every kind of bad file.

Bad files are built from a valid one by editing its parts (tensors, metadata,
hashes) and re-serialising, so each test breaks exactly one thing. Pickle
payloads are real: unpickling them would create a sentinel file, which must
never appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_same_state, init_kwargs, torch_state
from safetensors.torch import save as st_save

import jaxdsc
import torch_bridge
from jaxdsc import _io
from torch_bridge import CheckpointError
from torch_bridge.checkpoint import CONFIG_HASH_KEY, read_safetensors
from torch_bridge.convert import numpy_to_tensor


@pytest.fixture
def module() -> jaxdsc.SeparableConv:
    return jaxdsc.SeparableConv(3, 4, 3, mid_norm="batch", **init_kwargs(0))


@pytest.fixture
def good(tmp_path, module) -> Path:
    path = tmp_path / "good.safetensors"
    torch_bridge.save(module, path)
    return path


def parts(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors, metadata = read_safetensors(path)
    return {k: v.copy() for k, v in tensors.items()}, dict(metadata)


def rewrite(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str], *, rehash: bool = True) -> Path:
    """Serialise ``tensors`` + ``metadata``; with ``rehash`` the hashes match the new content,
    so only the intended defect remains."""
    metadata = dict(metadata)
    if rehash:
        hashes = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in tensors.items()}
        hashes[CONFIG_HASH_KEY] = hashlib.sha256(metadata["config"].encode()).hexdigest()
        metadata["sha256"] = json.dumps(hashes, sort_keys=True)
    path.write_bytes(st_save({k: numpy_to_tensor(v) for k, v in tensors.items()}, metadata=metadata))
    return path


def expect_error(path: Path, match: str, readers: tuple[str, ...] = ("read", "jax", "torch")) -> None:
    """Every reader raises CheckpointError (a ValueError) whose message names the file and the problem."""
    calls = {
        "read": lambda: torch_bridge.read(path),
        "jax": lambda: torch_bridge.load(path, framework="jax"),
        "torch": lambda: torch_bridge.load(path, framework="torch"),
    }
    for reader in readers:
        with pytest.raises(CheckpointError, match=match) as info:
            calls[reader]()
        assert isinstance(info.value, ValueError)
        assert str(path) in str(info.value), f"{reader}: message does not name the file: {info.value}"


# ---------------------------------------------------------------- the written bytes
def test_saving_is_deterministic_and_readable_by_the_reference_reader(tmp_path, module):
    from safetensors.torch import load_file

    a, b = torch_bridge.save(module, tmp_path / "a.safetensors"), torch_bridge.save(module, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()  # same module, same file: artifacts can be hashed
    twin = torch_bridge.to_torch(module)
    state = load_file(a)
    assert set(state) == set(twin.state_dict())
    for k, v in twin.state_dict().items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k
    header_len = int.from_bytes(a.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # tensors start aligned


# ---------------------------------------------------------------- atomic writes
def test_error_type():
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, good, module, monkeypatch, fail_at):
    old = good.read_bytes()
    before = sorted(os.listdir(tmp_path))

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device (simulated)")

    if fail_at == "write":  # the data is half-written when the disk fills up
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f: Any) -> None:
                self.f = f

            def __enter__(self) -> HalfWriter:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.f.close()

            def write(self, data: bytes) -> None:
                self.f.write(data[: len(data) // 2])
                boom()

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

        monkeypatch.setattr(_io.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(_io.os, fail_at, boom)
    module.pointwise.kernel[...] = module.pointwise.kernel[...] + 1  # new content
    with pytest.raises(OSError, match="simulated"):
        torch_bridge.save(module, good)
    monkeypatch.undo()
    assert good.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == before  # no temp file left behind
    torch_bridge.read(good)  # still a valid checkpoint


def test_write_replaces_atomically_and_creates_directories(tmp_path, module):
    path = tmp_path / "a" / "b" / "model.safetensors"
    torch_bridge.save(module, path)
    torch_bridge.save(module, path)  # overwrite
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]
    assert_same_state(torch_bridge.read(path).tensors, torch_bridge.torch_state_dict(module))


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_file_mode_follows_the_umask(tmp_path, module):
    """Regression: files were created through tempfile.mkstemp, i.e. mode 0600 whatever the
    umask, so a checkpoint saved to a shared directory was unreadable for everyone else."""
    old_umask = os.umask(0o022)
    try:
        torch_bridge.save(module, tmp_path / "m.safetensors")
        os.umask(0o027)
        torch_bridge.save(module, tmp_path / "g.safetensors")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.safetensors").stat().st_mode) == 0o640


def test_unsupported_module_is_refused_before_writing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"no JAX<->PyTorch conversion rule for .*Sequential"):
        torch_bridge.save(torch.nn.Sequential(), path)
    assert not path.exists()


# ---------------------------------------------------------------- bad files
def test_missing_key(good):
    tensors, metadata = parts(good)
    del tensors["pointwise.bias"]
    expect_error(rewrite(good, tensors, metadata), r"missing 1 tensor\(s\): pointwise\.bias")


def test_extra_key(good):
    tensors, metadata = parts(good)
    tensors["extra.weight"] = np.zeros(3, np.float32)
    expect_error(rewrite(good, tensors, metadata), r"unexpected 1 tensor\(s\): extra\.weight")


def test_wrong_shape(good):
    tensors, metadata = parts(good)
    tensors["pointwise.weight"] = tensors["pointwise.weight"][:2]
    expect_error(rewrite(good, tensors, metadata),
                 r"tensor 'pointwise\.weight' has shape \(2, 3, 1, 1\), expected \(4, 3, 1, 1\)")


def test_wrong_dtype(good):
    tensors, metadata = parts(good)
    tensors["pointwise.bias"] = tensors["pointwise.bias"].astype(np.float64)
    expect_error(rewrite(good, tensors, metadata),
                 r"tensor 'pointwise\.bias' has dtype float64, expected float32 \(no silent casts\)")


def test_wrong_counter_dtype(good):
    tensors, metadata = parts(good)
    tensors["norm.num_batches_tracked"] = tensors["norm.num_batches_tracked"].astype(np.int32)
    expect_error(rewrite(good, tensors, metadata), r"'norm\.num_batches_tracked' has dtype int32, expected int64")


def test_unknown_class(good):
    tensors, metadata = parts(good)
    metadata["class"] = "Transformer"
    expect_error(rewrite(good, tensors, metadata), r"unknown module class 'Transformer'")


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", ""])
def test_bad_config_json(good, config):
    tensors, metadata = parts(good)
    metadata["config"] = config
    expect_error(rewrite(good, tensors, metadata), r"bad metadata")


def test_config_not_matching_the_tensors(good):
    tensors, metadata = parts(good)
    config = json.loads(metadata["config"])
    config["out_channels"] = 7
    metadata["config"] = json.dumps(config)
    expect_error(rewrite(good, tensors, metadata), r"tensor 'pointwise\.weight' has shape \(4, 3, 1, 1\), expected \(7, 3, 1, 1\)")


def test_config_the_twin_rejects(good):
    tensors, metadata = parts(good)
    config = json.loads(metadata["config"])
    config["padding"] = "FULL"
    metadata["config"] = json.dumps(config)
    expect_error(rewrite(good, tensors, metadata), r"cannot build torch SeparableConv .*padding must be one of")


def test_tampered_config_fails_its_hash(good):
    tensors, metadata = parts(good)
    metadata["config"] = metadata["config"].replace('"mid_activation": null', '"mid_activation": "relu"')
    expect_error(rewrite(good, tensors, metadata, rehash=False), r"config metadata fails its SHA-256 check")


def test_tampered_tensor_bytes_fail_their_hash(good):
    tensors, metadata = parts(good)
    tensors["pointwise.weight"][0, 0, 0, 0] += 1.0
    expect_error(rewrite(good, tensors, metadata, rehash=False),
                 r"tensor 'pointwise\.weight' fails its SHA-256 check")


def test_missing_hash_entry(good):
    tensors, metadata = parts(good)
    hashes = json.loads(metadata["sha256"])
    hashes["ghost"] = hashes.pop("pointwise.bias")
    metadata["sha256"] = json.dumps(hashes)
    expect_error(rewrite(good, tensors, metadata, rehash=False), r"pointwise\.bias' fails its SHA-256")


@pytest.mark.parametrize("version", ["2", "x", ""])
def test_unsupported_format_version(good, version):
    tensors, metadata = parts(good)
    metadata["format_version"] = version
    expect_error(rewrite(good, tensors, metadata), r"format_version .* is not supported")


def test_plain_safetensors_has_no_metadata(tmp_path, module):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(st_save({k: numpy_to_tensor(v) for k, v in torch_bridge.torch_state_dict(module).items()}))
    expect_error(path, r"no jaxdsc metadata .*jaxdsc-convert --class")
    # ... but it is a valid plain state dict.
    assert_same_state(torch_bridge.read_state_dict(path), torch_bridge.torch_state_dict(module))


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file(good, keep):
    blob = good.read_bytes()
    good.write_bytes(blob[: keep if keep >= 0 else len(blob) - 1])
    expect_error(good, r"not a safetensors file|outside the .*data region|has \d+ bytes, expected")


def test_non_safetensors_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    expect_error(path, r"not a safetensors file")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", r"cannot read file")


def test_bad_framework_argument(good):
    with pytest.raises(ValueError, match=r"framework must be 'jax' or 'torch', got 'tf'"):
        torch_bridge.load(good, framework="tf")


# ---------------------------------------------------------------- pickles and plain .pt files
class _Payload:
    """Unpickling this creates ``self.sentinel`` (via builtins.open): proof of code execution."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.sentinel), "w"))


def _pickle_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    sentinel = tmp_path / "PWNED"
    payload = _Payload(sentinel)
    files = []
    raw = pickle.dumps({"weight": payload}, protocol=2)
    for name in ("raw.pt", "raw.pth", "raw.bin", "raw.ckpt", "raw.safetensors"):
        (tmp_path / name).write_bytes(raw)
        files.append(tmp_path / name)
    zipped = tmp_path / "zipped.pt"  # torch.save's zip container around the same payload
    torch.save({"weight": payload}, zipped)
    files.append(zipped)
    (tmp_path / "zipped.safetensors").write_bytes(zipped.read_bytes())
    files.append(tmp_path / "zipped.safetensors")
    assert not sentinel.exists()
    return sentinel, files


def test_pickle_payloads_are_refused_and_never_executed(tmp_path):
    sentinel, files = _pickle_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            torch_bridge.read_state_dict(path)
        if path.suffix == ".safetensors":
            expect_error(path, r"not a safetensors file")
    assert not sentinel.exists()
    # Sanity: the payload does work when unpickled unsafely (so the test could fail).
    pickle.loads((tmp_path / "raw.pt").read_bytes())
    assert sentinel.exists()


def test_plain_pt_state_dict_is_read_with_weights_only(tmp_path):
    twin = torch_bridge.nn.SeparableConv(3, 4, 3, mid_norm="batch")
    expected = torch_state(twin)
    for i, container in enumerate([twin.state_dict(), {"state_dict": twin.state_dict(), "epoch": 3}]):
        path = tmp_path / f"plain{i}.pt"
        torch.save(container, path)
        assert_same_state(torch_bridge.read_state_dict(path), expected)


@pytest.mark.parametrize(
    ("obj", "match"),
    [([1, 2, 3], r"expected a state dict mapping names to tensors"),
     ({"weight": 1.0}, r"expected a state dict mapping names to tensors"),
     ({1: torch.zeros(2)}, r"expected a state dict mapping names to tensors")],
)
def test_plain_pt_that_is_not_a_state_dict(tmp_path, obj, match):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=match) as info:
        torch_bridge.read_state_dict(path)
    assert str(path) in str(info.value)


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"weights\.npz: unknown file type '\.npz'"):
        torch_bridge.read_state_dict(path)


def test_mismatched_state_dict_into_module():
    """A state dict of another config is refused as a whole, before anything is copied."""
    small = jaxdsc.SeparableConv(3, 4, 3, **init_kwargs(0))
    big = jaxdsc.SeparableConv(3, 8, 3, **init_kwargs(1))
    before = torch_bridge.torch_state_dict(big)
    with pytest.raises(CheckpointError, match=r"state dict: tensor 'pointwise\.weight' has shape \(4, 3, 1, 1\), expected \(8, 3, 1, 1\)"):
        torch_bridge.convert.load_torch_state_dict(big, torch_bridge.torch_state_dict(small))
    assert_same_state(torch_bridge.torch_state_dict(big), before)
    twin = torch_bridge.nn.SeparableConv(3, 8, 3)
    with pytest.raises(CheckpointError, match=r"tensor 'pointwise\.weight' has shape \(4, 3, 1, 1\), expected \(8, 3, 1, 1\)"):
        torch_bridge.convert.build_torch("SeparableConv", torch_bridge.convert.module_config(twin)[1],
                                         torch_bridge.torch_state_dict(small))
