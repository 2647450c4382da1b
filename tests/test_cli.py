"""``jaxdsc-convert`` (torch_bridge.cli): conversions, --info, and one-line errors with exit status 2.

Called in-process through ``main([...])`` (fast); one subprocess smoke test
runs the installed console script when ``pip install -e .`` has put it on PATH.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import assert_same_state, torch_state

import torch_bridge
from torch_bridge import nn as tnn
from torch_bridge.cli import main
from torch_bridge.spec import SPECS

CONFIG = {"width": 2, "depth": 1, "num_classes": 3}


@pytest.fixture
def twin() -> tnn.DSCNet:
    torch.manual_seed(0)
    model = tnn.DSCNet(**CONFIG)
    with torch.no_grad():  # non-trivial BatchNorm statistics and counters
        model(torch.rand(4, 3, 8, 8))
    return model


@pytest.fixture
def plain_pt(tmp_path, twin) -> Path:
    path = tmp_path / "model.pt"
    torch.save(twin.state_dict(), path)
    return path


@pytest.fixture
def ours(tmp_path, twin) -> Path:
    path = tmp_path / "model.safetensors"
    torch_bridge.save(twin, path)
    return path


def run(capsys, *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(capsys, argv: list[Any], match: str) -> str:
    """Exit status 2, exactly one line on stderr starting with the program name, nothing on stdout."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("jaxdsc-convert: error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(match, err), err
    return err


# ---------------------------------------------------------------- help
def test_help_lists_classes_and_examples(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == ""
    for spec in SPECS:
        assert spec.name in out
    for text in ("examples:", "--class", "--config", "@", "--info", "--force", "weights_only=True", ".pth"):
        assert text in out, text


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("jaxdsc-convert ")


# ---------------------------------------------------------------- (a) plain state dict -> jaxdsc checkpoint
@pytest.mark.parametrize("config_form", ["inline", "file"])
def test_plain_pt_to_checkpoint(capsys, tmp_path, plain_pt, twin, config_form):
    config = json.dumps(CONFIG)
    if config_form == "file":
        (tmp_path / "config.json").write_text(config)
        config = f"@{tmp_path / 'config.json'}"
    out_path = tmp_path / "out.safetensors"
    code, out, err = run(capsys, plain_pt, "--class", "DSCNet", "--config", config, "-o", out_path)
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith(f"wrote {out_path} (jaxdsc checkpoint v1): DSCNet, ")
    ckpt = torch_bridge.read(out_path)
    assert ckpt.name == "DSCNet"
    assert ckpt.config == torch_bridge.convert.module_config(twin)[1]  # completed with the defaults
    assert_same_state(ckpt.tensors, torch_state(twin))
    jax_model = torch_bridge.load(out_path, framework="jax")
    assert_same_state(torch_bridge.torch_state_dict(jax_model), torch_state(twin))


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".ckpt", ".safetensors"])
def test_other_plain_inputs(capsys, tmp_path, twin, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(twin.state_dict(), str(path))
    elif suffix == ".ckpt":  # a training checkpoint with the weights under "state_dict"
        torch.save({"state_dict": twin.state_dict(), "epoch": 7}, path)
    else:
        torch.save(twin.state_dict(), path)
    out_path = tmp_path / "out.safetensors"
    code, _, err = run(capsys, path, "--class", "DSCNet", "--config", json.dumps(CONFIG), "-o", out_path)
    assert code == 0, err
    assert_same_state(torch_bridge.read(out_path).tensors, torch_state(twin))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_model_state_dict(capsys, tmp_path, twin, prefix):
    """State dicts of DistributedDataParallel / torch.compile models convert as the bare model's."""
    path = tmp_path / "ddp.pt"
    torch.save({prefix + k: v for k, v in twin.state_dict().items()}, path)
    out_path = tmp_path / "out.safetensors"
    code, out, err = run(capsys, path, "--class", "DSCNet", "--config", json.dumps(CONFIG), "-o", out_path)
    assert code == 0, err
    assert f"(plain state dict (stripped the wrapper prefix {prefix!r}))" in out
    assert_same_state(torch_bridge.read(out_path).tensors, torch_state(twin))


def test_strip_wrapper_prefixes_only_when_every_key_has_it():
    state = {"module.a": 1, "module.b.c": 2}
    assert torch_bridge.strip_wrapper_prefixes(state) == ({"a": 1, "b.c": 2}, "module.")
    mixed = {"module.a": 1, "b": 2}
    assert torch_bridge.strip_wrapper_prefixes(mixed) == (mixed, "")
    assert torch_bridge.strip_wrapper_prefixes({}) == ({}, "")


# ---------------------------------------------------------------- (b) jaxdsc checkpoint -> plain / copy
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_checkpoint_to_plain_pytorch(capsys, tmp_path, ours, twin, suffix):
    out_path = tmp_path / f"plain{suffix}"
    code, out, err = run(capsys, ours, "-o", out_path)
    assert code == 0 and err == "" and out.count("\n") == 1
    assert "plain PyTorch state dict" in out
    state = torch.load(out_path, weights_only=True)  # a PyTorch user's way
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    user_model = tnn.DSCNet(**CONFIG)
    user_model.load_state_dict(state, strict=True)
    assert_same_state(torch_state(user_model), torch_state(twin))


def test_checkpoint_revalidated_copy(capsys, tmp_path, ours):
    copy = tmp_path / "copy.safetensors"
    code, out, _ = run(capsys, ours, "-o", copy)
    assert code == 0 and "jaxdsc checkpoint" in out
    a, b = torch_bridge.read(ours), torch_bridge.read(copy)
    assert a.metadata == b.metadata
    assert_same_state(a.tensors, b.tensors)


def test_force_overwrites(capsys, tmp_path, ours, plain_pt):
    target = tmp_path / "exists.pt"
    target.write_bytes(b"old")
    expect_error(capsys, [ours, "-o", target], r"exists; pass --force to overwrite it")
    assert target.read_bytes() == b"old"
    code, _, _ = run(capsys, ours, "-o", target, "--force")
    assert code == 0 and target.read_bytes() != b"old"


# ---------------------------------------------------------------- (c) --info
def test_info_on_checkpoint(capsys, ours, twin):
    code, out, err = run(capsys, "--info", ours)
    assert code == 0 and err == ""
    n_params = sum(p.numel() for p in twin.parameters())
    n_tensors = len(twin.state_dict())
    assert "format version 1" in out
    assert "class: DSCNet" in out
    assert f"config: {json.dumps(torch_bridge.convert.module_config(twin)[1], sort_keys=True)}" in out
    assert f"{n_tensors} tensors, {n_params:,} parameters" in out
    assert "sha256: verified" in out


def test_info_on_plain_state_dict(capsys, plain_pt, twin):
    code, out, _ = run(capsys, "--info", plain_pt)
    assert code == 0
    assert "plain PyTorch state dict" in out and f"{len(twin.state_dict())} tensors" in out


def test_info_detects_tampering(capsys, ours):
    blob = bytearray(ours.read_bytes())
    blob[-1] ^= 0x01  # last byte of the last tensor
    ours.write_bytes(bytes(blob))
    expect_error(capsys, ["--info", ours], r"fails its SHA-256 check")


# ---------------------------------------------------------------- errors: one line, exit 2
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["{plain}", "-o", "{tmp}/o.safetensors"], r"plain PyTorch state dict.*pass --class and --config"),
        (["{plain}", "--class", "DSCNet", "-o", "{tmp}/o.safetensors"], r"pass --config"),
        (["{plain}", "--class", "ResNet", "--config", "{{}}", "-o", "{tmp}/o.safetensors"],
         r"--class: unknown module class 'ResNet'"),
        (["{plain}", "--class", "DSCNet", "--config", "{{width: 2}}", "-o", "{tmp}/o.safetensors"],
         r"--config is not valid JSON \(Expecting property name"),
        (["{plain}", "--class", "DSCNet", "--config", "[2, 1]", "-o", "{tmp}/o.safetensors"],
         r"--config must be a JSON object .*got list"),
        (["{plain}", "--class", "DSCNet", "--config", "@{tmp}/nope.json", "-o", "{tmp}/o.safetensors"],
         r"--config file .*nope\.json: cannot read it"),
        (["{plain}", "--class", "DSCNet", "--config", '{{"in_features": 3, "width": 2}}', "-o", "{tmp}/o.safetensors"],
         r"JAX argument names.*'in_features' -> 'in_channels'"),
        (["{plain}", "--class", "DSCNet", "--config", '{{"width": 4, "depth": 1, "num_classes": 3}}',
          "-o", "{tmp}/o.safetensors"], r"model\.pt: tensor '.*' has shape .*, expected"),
        (["{plain}", "--class", "DSCNet", "--config", '{{"width": 2}}', "-o", "{tmp}/o.safetensors"],
         r"model\.pt: missing \d+ tensor\(s\)"),
        (["{plain}", "--class", "DSCNet", "--config", '{{"width": 2, "depth": 1, "num_classes": 3, "foo": 1}}',
          "-o", "{tmp}/o.safetensors"], r"cannot build torch DSCNet .*unexpected keyword argument 'foo'"),
        (["{plain}", "--class", "SeparableConv", "--config", '{{"in_channels": 3}}', "-o", "{tmp}/o.safetensors"],
         r"cannot build torch SeparableConv .*missing 2 required positional arguments"),
        (["{ours}", "--class", "DSCNet", "--config", "{{}}", "-o", "{tmp}/o.pt"], r"drop --class/--config"),
        (["{ours}", "-o", "{tmp}/o.onnx"], r"-o/--output .*unknown output type '\.onnx'"),
        (["{ours}", "-o", "{ours}", "--force"], r"is the input file"),
        (["{tmp}/missing.pt", "-o", "{tmp}/o.safetensors"], r"missing\.pt: no such file"),
        (["{tmp}", "-o", "{tmp}/o.safetensors"], r"is a directory"),
        (["{tmp}/model.h5", "-o", "{tmp}/o.safetensors"], r"unknown input type '\.h5'"),
        (["{ours}"], r"missing -o/--output"),
        ([], r"missing SOURCE"),
        (["--info", "{ours}", "{ours}"], r"--info takes one FILE"),
        (["--info", "{tmp}/missing.safetensors"], r"no such file"),
        (["--bogus"], r"unrecognized arguments: --bogus"),
        (["{truncated}", "-o", "{tmp}/o.pt"], r"truncated\.safetensors: "),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_errors(capsys, tmp_path, plain_pt, ours, argv, match):
    (tmp_path / "model.h5").write_bytes(b"HDF")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ours.read_bytes()[:-100])
    fields = {"plain": plain_pt, "ours": ours, "tmp": tmp_path, "truncated": truncated}
    argv = [a.format(**fields) for a in argv]
    expect_error(capsys, argv, match)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pt").exists()


class _Payload:
    """Unpickling this creates the sentinel file: proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.sentinel), "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.safetensors", "zip.pt", "zip.ckpt"])
def test_pickle_payloads_are_refused_never_executed(capsys, tmp_path, name):
    sentinel = tmp_path / "PWNED"
    path = tmp_path / name
    if name.startswith("zip"):
        torch.save({"weight": _Payload(sentinel)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": _Payload(sentinel)}, protocol=2))
    config = ["--class", "DSCNet", "--config", json.dumps(CONFIG)]
    if name.endswith(".safetensors"):
        match = r"not a safetensors file"
    else:
        match = r"refused: not a weights-only PyTorch state dict"
    expect_error(capsys, [path, *config, "-o", tmp_path / "o.safetensors"], match)
    expect_error(capsys, ["--info", path], match)
    assert not sentinel.exists()
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------- the installed console script
def test_console_script_smoke(ours):
    exe = shutil.which("jaxdsc-convert")
    if exe is None:
        pytest.skip("jaxdsc-convert is not installed (pip install -e .)")
    done = subprocess.run([exe, "--info", str(ours)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "class: DSCNet" in done.stdout and "sha256: verified" in done.stdout
