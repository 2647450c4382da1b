"""Zoo models in the trainer (train/zoo_model.py): torchvision:mobilenet_v2 at width 0.25.

One short end-to-end run (1 step on tiny generated CIFAR data) checks --model/--model-kwargs,
--freeze/--head-lr on upstream names, summary.json's input_mean/input_std and --export-torch:
the file loads into torchvision's class with strict=True and gives the trainer's test accuracy.
The other tests use the Python API (no training).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train import zoo_model
from train.config import ConfigError, ModelConfig
from train.optim import param_paths

torchvision = pytest.importorskip("torchvision")

NAME = "torchvision:mobilenet_v2"
KW = {"width_mult": 0.25}


# Upstream's first two stages, one block each: the same classes and both block types (expansion 1
# and 6, stride 2) before the last conv and the classifier. Building the JAX model compiles one
# initializer per parameter shape and the train step compiles per layer, so the full 17 blocks
# would cost most of these tests' time without checking anything more.
TWO_STAGES = {**KW, "inverted_residual_setting": [[1, 16, 1, 1], [6, 24, 1, 2]]}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"model": NAME, "model_kwargs": json.dumps(KW), "num_classes": 10, "impl": "xla", **kw})


def test_param_paths_are_upstream_module_names():
    model = nnx.eval_shape(lambda: zoo_model.build(_cfg(), 0))
    jax_modules = {p.rsplit(".", 1)[0] for p in param_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    with torch.device("meta"):
        tm = torchvision.models.mobilenet_v2(num_classes=10, **KW)
    torch_modules = {n.rsplit(".", 1)[0] for n, _ in tm.named_parameters()}
    assert jax_modules == torch_modules
    assert zoo_model.classifier_paths(_cfg()) == {"classifier.1.kernel", "classifier.1.bias"}
    assert zoo_model.head_prefixes(_cfg()) == ("classifier.",)
    assert zoo_model.head_prefixes(ModelConfig()) == ("head.",)  # DSCNet unchanged


def test_init_from_upstream_state_dict(tmp_path):
    torch.manual_seed(0)
    tm = torchvision.models.mobilenet_v2(num_classes=7, **TWO_STAGES).eval()
    two = json.dumps(TWO_STAGES)
    for m in tm.modules():  # non-default BN statistics, so a skipped load would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    sd = tm.state_dict()
    pth, st = tmp_path / "mbv2.pth", tmp_path / "mbv2.safetensors"
    torch.save(sd, pth)
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    from torch_bridge.convert import torch_state_dict

    for path in (pth, st):  # same classes: every tensor arrives unchanged
        model, note = zoo_model.init_from(_cfg(model_kwargs=two, num_classes=7), path, seed=0)
        got = torch_state_dict(model)
        assert set(got) == set(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    # Other classes: the classifier is new, everything else is the file's.
    model, note = zoo_model.init_from(_cfg(model_kwargs=two, num_classes=10), pth, seed=0)
    assert "new 10-class classifier" in note
    got = torch_state_dict(model)
    assert got["classifier.1.weight"].shape == (10, sd["classifier.1.weight"].shape[1])
    np.testing.assert_array_equal(got["features.3.0.weight"], sd["features.3.0.weight"].numpy())
    np.testing.assert_array_equal(got["features.3.1.running_var"], sd["features.3.1.running_var"].numpy())
    # Any other shape difference is refused by name.
    bad = dict(sd)
    bad["features.1.conv.0.0.weight"] = torch.zeros(3, 1, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"features\.1\.conv\.0\.0\.weight"):
        zoo_model.init_from(_cfg(model_kwargs=two, num_classes=7), tmp_path / "bad.pth", seed=0)
    # A width that does not match: refused, not partly loaded.
    with pytest.raises(ConfigError, match="only the classifier"):
        zoo_model.init_from(_cfg(model_kwargs=json.dumps({**TWO_STAGES, "width_mult": 0.5}), num_classes=7), pth, seed=0)
    bad = {k: v for k, v in sd.items() if k != "features.2.conv.1.0.weight"}
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="missing"):
        zoo_model.init_from(_cfg(model_kwargs=two, num_classes=7), tmp_path / "missing.pth", seed=0)


def test_input_norm_and_kwargs():
    assert zoo_model.input_norm(_cfg()) == (zoo_model.IMAGENET_MEAN, zoo_model.IMAGENET_STD)
    cfg = _cfg(model_kwargs=json.dumps({**KW, "input_mean": [0.5] * 3, "input_std": [0.25] * 3}))
    assert zoo_model.input_norm(cfg) == ((0.5,) * 3, (0.25,) * 3)
    assert zoo_model.model_kwargs(cfg) == {**KW, "num_classes": 10}
    with pytest.raises(ConfigError, match="--num-classes"):
        zoo_model.model_kwargs(_cfg(model_kwargs='{"num_classes": 3}'))
    with pytest.raises(ConfigError, match="input_std"):
        zoo_model.input_norm(_cfg(model_kwargs='{"input_std": [1, 0, 1]}'))
    with pytest.raises(ConfigError, match=r"unknown model name"):
        zoo_model.build(_cfg(model="torchvision:nope"), 0)


@pytest.mark.slow
def test_train_freeze_head_lr_export_same_accuracy_in_torch(tmp_path):
    from train.cli import main
    from train.data import load_or_download
    from train.testing import write_cifar10

    data = write_cifar10(tmp_path / "data", n_train=32, n_test=32)
    work, out = tmp_path / "run", tmp_path / "out.safetensors"
    init = tmp_path / "init.pth"
    torch.manual_seed(1)
    tm = torchvision.models.mobilenet_v2(num_classes=1000, **TWO_STAGES)
    torch.save(tm.state_dict(), init)  # an "ImageNet" checkpoint: 1000 classes, re-initialised to 10
    code = main(["--preset", "tiny", "--data-dir", str(data), "--workdir", str(work), "--model", NAME,
                 "--model-kwargs", json.dumps(TWO_STAGES), "--num-classes", "10", "--init-from", str(init),
                 "--epochs", "1", "--batch-size", "32", "--eval-batch-size", "32", "--impl", "xla",
                 "--freeze", "features.0.*", "--head-lr", "0.05", "--no-progress", "--no-plot",
                 "--export-torch", str(out)])
    assert code == 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["input_mean"] == list(zoo_model.IMAGENET_MEAN)
    assert summary["input_std"] == list(zoo_model.IMAGENET_STD)
    assert summary["model"].startswith(NAME)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    mean, std = json.loads(meta["input_mean"]), json.loads(meta["input_std"])
    assert (mean, std) == (summary["input_mean"], summary["input_std"])

    sd = load_file(str(out))
    # --freeze features.0.*: the stem's conv and BN affine are the file's, bit for bit.
    init_sd = tm.state_dict()
    for k in ("features.0.0.weight", "features.0.1.weight", "features.0.1.bias"):
        torch.testing.assert_close(sd[k], init_sd[k], rtol=0, atol=0)
    assert not torch.equal(sd["features.1.conv.0.0.weight"], init_sd["features.1.conv.0.0.weight"])

    net = torchvision.models.mobilenet_v2(num_classes=10, **TWO_STAGES)
    net.load_state_dict(sd, strict=True)
    net.eval()
    ds = load_or_download(str(data), tmp_path / "cache", "", "", progress=False)
    x = torch.from_numpy(ds.test_images).permute(0, 3, 1, 2).float() / 255  # ToTensor()
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = net(x).argmax(1).numpy()
    acc = float(np.mean(pred == ds.test_labels))
    # Equal as counts of correct images (a logit tie within float error could flip one; none here).
    assert round(acc * len(pred)) == round(summary["test_accuracy"] * len(pred))
    # Stronger than the count: the same prediction per image as the JAX model read back from the file.
    import torch_bridge

    jm = torch_bridge.load(out)
    jm.eval()
    xj = (ds.test_images.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(np.asarray(jax.numpy.argmax(jm(xj), -1)), pred)
