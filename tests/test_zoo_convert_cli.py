"""jaxdsc-convert --arch and the loaders of plain upstream state dicts (bad input and fuzzing).

An upstream state dict (``.pth`` read with ``weights_only=True``, or ``.safetensors``) plus
``--arch`` / ``--config`` becomes a jaxdsc checkpoint and back, bit-exact; anything that does
not match the architecture is refused with one line (exit status 2) or, in the library, a
``CheckpointError`` (``UnsupportedModelError`` for key / shape mismatches). A plain state dict
has no hashes: a flipped data byte changes a weight, and the loaded model then holds exactly
what the file holds; a broken container is refused, never partly loaded.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torchvision = pytest.importorskip("torchvision")

import _zoo_checks as zc  # noqa: E402

import torch_bridge  # noqa: E402
from torch_bridge import CheckpointError, UnsupportedModelError  # noqa: E402
from torch_bridge.cli import main  # noqa: E402

ARCH = "torchvision:mobilenet_v2"
CONFIG = {"width_mult": 0.75, "num_classes": 10}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    torch.manual_seed(0)
    model = zc.randomize(torchvision.models.mobilenet_v2(**CONFIG), seed=1).eval()
    root = tmp_path_factory.mktemp("zoo_cli")
    torch.save(model.state_dict(), root / "mbv2.pth")
    safetensors.torch.save_file(model.state_dict(), root / "mbv2_plain.safetensors")
    return model, root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pth_to_jaxdsc_and_back(upstream, capsys, tmp_path):
    model, root = upstream
    out = tmp_path / "mbv2.safetensors"
    code, text, err = _run(capsys, root / "mbv2.pth", "--arch", ARCH, "--config", json.dumps(CONFIG), "-o", out)
    assert code == 0, err
    assert ARCH in text and "plain upstream state dict" in text
    ckpt = torch_bridge.read(out)
    assert ckpt.name == ARCH and ckpt.config["width_mult"] == 0.75 and ckpt.config["num_classes"] == 10
    zc.assert_state_equal(torch_bridge.load(out, "torch").state_dict(), model.state_dict())
    fresh = torchvision.models.mobilenet_v2(**CONFIG)
    fresh.load_state_dict(safetensors.torch.load_file(out), strict=True)
    back = tmp_path / "again.pth"
    code, _, err = _run(capsys, out, "-o", back)
    assert code == 0, err
    zc.assert_state_equal(torch.load(back, weights_only=True), model.state_dict())


def test_plain_safetensors_input_with_wrapper_prefix(upstream, capsys, tmp_path):
    model, _ = upstream
    src = tmp_path / "ddp.safetensors"
    safetensors.torch.save_file({f"module.{k}": v for k, v in model.state_dict().items()}, src)
    code, text, err = _run(capsys, src, "--arch", ARCH, "--config", json.dumps(CONFIG), "-o",
                           tmp_path / "out.safetensors")
    assert code == 0, err
    assert "stripped the wrapper prefix 'module.'" in text


@pytest.mark.parametrize("argv,message", [
    (["--arch", ARCH], r"missing .* tensor|has shape"),  # default width 1.0 does not fit 0.75 weights
    (["--arch", ARCH, "--config", json.dumps({**CONFIG, "num_classes": 11})], r"classifier\.1\.weight"),
    (["--arch", "torchvision:mobilenet_v9"], r"--arch: no bridge family serves"),
    (["--arch", "mobilenet_v2"], r"--arch must name a zoo architecture"),
    (["--arch", ARCH, "--config", json.dumps({**CONFIG, "widht_mult": 1})], r"unexpected keyword|widht_mult"),
    (["--arch", ARCH, "--class", "DSCNet", "--config", "{}"], r"--arch and --class are exclusive"),
])
def test_mismatched_arch_or_config_is_one_line(upstream, capsys, tmp_path, argv, message):
    _, root = upstream
    out = tmp_path / "x.safetensors"
    code, _, err = _run(capsys, root / "mbv2.pth", *argv, "-o", out)
    assert code == 2 and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_library_loader_refuses_mismatches(upstream):
    _, root = upstream
    state = torch_bridge.read_state_dict(root / "mbv2.pth")
    with pytest.raises(UnsupportedModelError, match=r"unexpected 1 tensor\(s\): extra"):
        torch_bridge.convert.build_jax(ARCH, CONFIG, {**state, "extra": np.zeros(1, np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"mix floating dtypes"):  # no silent casts
        bad = dict(state)
        bad["features.0.1.running_var"] = bad["features.0.1.running_var"].astype(np.float64)
        torch_bridge.convert.build_jax(ARCH, CONFIG, bad)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"features.0.0.weight": Evil()}))
    with pytest.raises(CheckpointError, match="refused: not a weights-only"):
        torch_bridge.read_state_dict(path)


FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(pos=st.integers(min_value=0, max_value=10**9), value=st.integers(min_value=0, max_value=255),
       cut=st.booleans())
def test_fuzzed_upstream_files_load_exactly_or_are_refused(upstream, tmp_path, pos, value, cut):
    _, root = upstream
    blob = bytearray((root / "mbv2_plain.safetensors").read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    pos %= header + 64  # mostly the header, the structure a loader must not misread
    if cut:
        del blob[pos:]
    else:
        blob[pos] = value
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(blob))
    try:
        tensors = torch_bridge.read_state_dict(path)
        model = torch_bridge.convert.build_jax(ARCH, CONFIG, tensors)
    except CheckpointError:
        return
    zc.assert_state_equal(torch_bridge.torch_state_dict(model), tensors)  # all of it, as in the file
