"""Loading never executes code from a file; corruption is detected; the only failure is a ValueError.

* Pickle payloads (raw pickle, ``torch.save`` zip and legacy containers)
  disguised as ``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors`` go through
  every loader: ``torch_bridge.load``/``read``/``read_state_dict``,
  ``--init-from`` (with and without ``--init-config``, and the whole
  ``jaxdsc-train`` command) and ``jaxdsc-convert``. Each is refused with a
  ValueError naming the file, and the sentinel file the payload would create
  never appears.
* Plain state dicts are read only with ``torch.load(weights_only=True)``.
* A flipped bit in the data region names the tensor that holds it.
* Fuzzing of ``--init-from`` and ``jaxdsc-convert --info`` (the
  ``torch_bridge`` readers: tests/test_fuzz_checkpoint.py).
* ``ruff`` S101 (no ``assert`` in library code).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import _faults_files as files

import torch_bridge

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ["torch_bridge.load(jax)", "torch_bridge.load(torch)", "torch_bridge.read", "torch_bridge.read_state_dict",
           "--init-from", "--init-from --init-config", "jaxdsc-convert", "jaxdsc-convert --info",
           "jaxdsc-train --init-from"]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from train.testing import write_cifar10

    return write_cifar10(tmp_path_factory.mktemp("data"), 32, 16)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, dict[str, np.ndarray]]:
    path = files.valid_file(tmp_path_factory.mktemp("good") / "ok.safetensors")
    return path.read_bytes(), torch_bridge.read(path).tensors


def test_every_loader_is_covered(tmp_path, data):
    assert sorted(files.loaders(tmp_path, data)) == sorted(LOADERS)


@pytest.mark.parametrize("payload", files.PAYLOADS)
def test_payload_runs_when_unpickled_unsafely(tmp_path, payload):
    assert files.payload_works(tmp_path, payload)  # so the refusal tests below can fail


@pytest.mark.parametrize("payload", files.PAYLOADS)
@pytest.mark.parametrize("loader", LOADERS)
def test_pickle_payloads_are_refused_and_never_run(tmp_path, data, loader, payload):
    load = files.loaders(tmp_path, data)[loader]
    for suffix in files.SUFFIXES:
        trial = files.pickle_trial(tmp_path, loader, load, suffix, payload)
        assert trial.ok, trial.detail
    assert not list(tmp_path.glob("PWNED*"))


def test_plain_state_dicts_are_read_with_weights_only(tmp_path, monkeypatch):
    from flax import nnx

    import jaxdsc

    twin = torch_bridge.to_torch(jaxdsc.models.DSCNet(10, width=4, depth=1, rngs=nnx.Rngs(0)))
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for i, (name, load) in enumerate(files.loaders(tmp_path).items()):
        if name in ("torch_bridge.load(jax)", "torch_bridge.load(torch)", "torch_bridge.read", "--init-from"):
            continue  # these accept torch_bridge.save files only (no torch.load at all)
        path = tmp_path / f"plain{i}.pt"
        torch.save(twin.state_dict(), path)
        calls.clear()
        load(path)
        assert calls and all(c is True for c in calls), (name, calls)


@FUZZ
@given(position=st.integers(0, 10**9), bit=st.integers(0, 7))
def test_a_flipped_bit_in_the_data_names_its_tensor(tmp_path, good, position, bit):
    trial = files.bitflip_trial(good[0], tmp_path / "flip.safetensors", position, bit)
    assert trial.ok, trial.detail


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(files.SUFFIXES))
def test_fuzz_init_from_and_convert_random_bytes(tmp_path, data, suffix):
    readers = {k: v for k, v in files.loaders(tmp_path).items() if k.startswith(("--init-from", "jaxdsc-convert"))}
    trial = files.fuzz_one(tmp_path / f"random{suffix}", data, None, readers)
    assert trial.ok, trial.detail


@FUZZ
@given(position=st.integers(0, 10**9), bit=st.integers(0, 7), cut=st.booleans())
def test_fuzz_init_from_flips_and_truncations(tmp_path, good, position, bit, cut):
    blob = bytearray(good[0])
    if cut:
        blob = blob[: position % len(blob)]
    else:
        blob[position % len(blob)] ^= 1 << bit
    readers = {k: v for k, v in files.fuzz_readers().items() if k in ("--init-from", "torch_bridge.read")}
    readers["jaxdsc-convert --info"] = files.loaders(tmp_path)["jaxdsc-convert --info"]
    trial = files.fuzz_one(tmp_path / "mutated.safetensors", bytes(blob), good[1], readers)
    assert trial.ok, trial.detail


def test_ruff_s101_no_assert_in_library_code():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    done = subprocess.run([ruff, "check", "--select", "S101", "--no-cache", "jaxdsc", "torch_bridge", "train"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
