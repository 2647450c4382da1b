"""Fine-tuning: --init-from (torch_bridge file, plain state dict + config, our workdir), new head, --freeze."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from filelock import FileLock
from flax import nnx

import torch_bridge
from jaxdsc.models import DSCNet
from train import cli
from train.config import ConfigError, ModelConfig
from train.model import compiled_init, initial_model
from train.testing import write_cifar10

FROZEN = ("stem.conv.weight", "stem.bn.weight", "stem.bn.bias", "blocks.0.depthwise.weight",
          "blocks.0.pointwise.weight")


def _cifar100_model(seed: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    # Built by the trainer's compiled initialisers: the eager DSCNet(...) compiled and ran its
    # initialisers op by op (seconds of this module's time); any weights serve as the "pretrained" ones.
    return nnx.split(DSCNet(100, width=8, depth=1, rngs=nnx.Rngs(params=jax.random.key(seed))))


@pytest.fixture(scope="module")
def shared(session_shared_dir) -> Path:
    """One directory for every xdist worker of the session: the fixtures below are built once, by the
    first worker to get here, under a lock (each worker used to repeat the pretrained model and the
    fine-tuning run, ~50-65 s loaded). The tests only read them."""
    return session_shared_dir / "finetune_shared"


@pytest.fixture(scope="module")
def pretrained(shared) -> dict[str, Path]:
    import torch

    root = shared / "pretrained"
    paths = {"file": root / "c100.safetensors", "pt": root / "c100.pt", "data": root / "d"}
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            model = compiled_init(_cifar100_model, seed=7)  # a "CIFAR-100" model
            assert write_cifar10(paths["data"], 256, 64) == paths["data"]
            torch_bridge.save(model, paths["file"])
            torch.save(torch_bridge.to_torch(model).state_dict(), paths["pt"])
            (root / "done").touch()
    return paths


@pytest.fixture(scope="module")
def finetuned(pretrained, shared) -> Path:
    workdir = shared / "finetune"
    with FileLock(str(workdir) + ".lock"):
        if not workdir.with_name("finetune.done").exists():  # beside it: tests copy the workdir
            args = ["--preset", "tiny", "--data-dir", str(pretrained["data"]), "--workdir", str(workdir),
                    "--no-progress", "--no-plot", "--train-limit", "0", "--test-limit", "0", "--batch-size", "32",
                    "--epochs", "1", "--init-from", str(pretrained["file"]), "--num-classes", "10",
                    "--freeze", "stem.*", r"blocks\.0\.(depthwise|pointwise)", "--head-lr", "0.05",
                    "--export-torch", str(workdir / "out.safetensors")]
            assert cli.main(args) == 0
            workdir.with_name("finetune.done").touch()
    return workdir


def test_finetune_replaces_head_and_freezes(pretrained, finetuned, capsys):
    before = torch_bridge.read(pretrained["file"]).tensors
    after = torch_bridge.read(finetuned / "out.safetensors")
    assert after.config["num_classes"] == 10 and after.tensors["head.weight"].shape == (10, 32)
    for key in FROZEN:
        np.testing.assert_array_equal(after.tensors[key], before[key], err_msg=key)
    for key in ("blocks.1.depthwise.weight", "blocks.2.pointwise.weight", "blocks.0.bn_dw.weight"):
        assert not np.array_equal(after.tensors[key], before[key]), key
    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["steps"] == 8 and 0 <= summary["test_accuracy"] <= 1


def test_init_sources_agree(pretrained, finetuned):
    from_file, note = initial_model(ModelConfig(init_from=str(pretrained["file"]), num_classes=100), 0)
    assert "torch_bridge file" in note and "new" not in note
    config = json.dumps({"width": 8, "depth": 1, "num_classes": 100})
    from_pt, note = initial_model(ModelConfig(init_from=str(pretrained["pt"]), init_config=config, num_classes=100), 0)
    assert "state dict" in note
    a, b = torch_bridge.torch_state_dict(from_file), torch_bridge.torch_state_dict(from_pt)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # our own workdir: the weights it ended with (EMA off: the live ones), as exported
    from_dir, note = initial_model(ModelConfig(init_from=str(finetuned)), 0)
    assert "jaxdsc-train checkpoint" in note
    exported = torch_bridge.read(finetuned / "out.safetensors").tensors
    got = torch_bridge.torch_state_dict(from_dir)
    assert got.keys() == exported.keys() and all(np.array_equal(got[k], exported[k]) for k in got)


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file or directory"),
    ("pt_without_config", "not a torch_bridge.save file; for a plain PyTorch state dict also pass --init-config"),
    ("bad_config", "--init-config is not valid JSON"),
    ("wrong_class", "holds a DepthwiseConv, expected DSCNet"),
])
def test_bad_init_sources_give_one_line(pretrained, tmp_path, kind, message):
    import jaxdsc

    cfg = {"missing": ModelConfig(init_from=str(tmp_path / "nope.safetensors")),
           "pt_without_config": ModelConfig(init_from=str(pretrained["pt"])),
           "bad_config": ModelConfig(init_from=str(pretrained["pt"]), init_config="{width: 8"),
           "wrong_class": ModelConfig(init_from=str(tmp_path / "dw.safetensors"))}[kind]
    if kind == "wrong_class":
        torch_bridge.save(jaxdsc.DepthwiseConv(4, 3, rngs=nnx.Rngs(0)), tmp_path / "dw.safetensors")
    with pytest.raises(ConfigError) as info:
        initial_model(cfg, 0)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_trainer_exports_its_workdir(finetuned, tmp_path, capsys, suffix):
    import torch

    out = tmp_path / f"exported{suffix}"
    assert cli.main(["export", str(finetuned), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    want = torch_bridge.read(finetuned / "out.safetensors")  # what --export-torch wrote at the end of the run
    if suffix == ".safetensors":
        got = torch_bridge.read(out)
        assert got.name == "DSCNet" and got.config == want.config
        tensors = got.tensors
    else:
        tensors = {k: v.numpy() for k, v in torch.load(out, weights_only=True).items()}
    assert tensors.keys() == want.tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(tensors[k], want.tensors[k], err_msg=k)
    # an existing output needs --force; --force overwrites
    assert cli.main(["export", str(finetuned), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli.main(["export", str(finetuned), str(out), "--force"]) == 0


@pytest.mark.parametrize(("argv", "match"), [
    (["{empty}", "{tmp}/x.safetensors"], "no jaxdsc-train checkpoint"),
    (["{tmp}/missing", "{tmp}/x.safetensors"], "is not a directory"),
    (["{w}", "{tmp}/x.onnx"], "unknown output type '.onnx'"),
    (["{w}"], "the following arguments are required: OUT"),
])
def test_export_errors_are_one_line(finetuned, tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    fill = {"empty": tmp_path / "empty", "tmp": tmp_path, "w": finetuned}
    assert cli.main(["export", *(a.format(**fill) for a in argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and err.startswith("jaxdsc-train")


def test_converter_points_old_workdir_command_lines_to_the_trainer(finetuned, tmp_path, capsys):
    from torch_bridge import cli as convert_cli

    out = tmp_path / "exported.safetensors"
    assert convert_cli.main([str(finetuned), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run: jaxdsc-train export {finetuned} OUT.safetensors" in err and "\n" not in err
    assert not out.exists()


def test_relative_workdir_and_init_from(pretrained, finetuned, tmp_path, monkeypatch):
    # orbax wants absolute checkpoint paths; the trainer must accept relative ones from the command line.
    import shutil

    shutil.copytree(finetuned, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "tiny", "--data-dir", str(pretrained["data"]), "--workdir", "run", "--no-progress",
            "--no-plot", "--train-limit", "64", "--test-limit", "64", "--batch-size", "32", "--epochs", "1",
            "--init-from", "src"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert any((tmp_path / "run" / "checkpoints").iterdir())


def test_init_from_workdir_checks_shapes(finetuned, tmp_path):
    # A config.json that disagrees with the stored arrays: refused by name, before any array is used.
    import shutil

    shutil.copytree(finetuned, tmp_path / "w")
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    config["model"]["width"] = 4
    (tmp_path / "w" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        initial_model(ModelConfig(init_from=str(tmp_path / "w")), 0)
    message = str(info.value)
    assert "is stored as" in message and "expected" in message and "\n" not in message
