"""The segmentation task in the trainer (``--task shapes-seg``): flags, steps, one short run.

The pieces are checked against independent references: the loss against
``torch.nn.CrossEntropyLoss(ignore_index=255)``, the eval step's confusion
matrix against the NumPy one of :mod:`train.seg_metrics`, the augmentation by
a label map painted into the image. One end-to-end run (a small U-Net on 32x32
images; DeepLabV3+ compiles for minutes on 2 cores, so it is built, not
trained, here) checks summary.json, predictions.png, ``--export-torch`` (the
PyTorch twin scores the same mIoU), ``jaxdsc-train export`` and
``--init-from WORKDIR`` of the run.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import seg_data, seg_metrics, seg_steps, zoo_model
from train.config import (
    PRESETS,
    SHAPES_SEG_CLASSES,
    Config,
    ConfigError,
    ModelConfig,
    validate,
    with_overrides,
)

torch = pytest.importorskip("torch")


def _seg(**overrides) -> Config:
    return with_overrides(PRESETS["shapes-seg"], overrides)


def test_config_contract():
    assert SHAPES_SEG_CLASSES == seg_data.NUM_CLASSES
    validate(PRESETS["shapes-seg"])
    validate(PRESETS["shapes-seg-unet"])
    bad = [
        ({"model": "dscnet", "model_kwargs": "", "backbone": ""}, "--task shapes-seg needs --model"),
        ({"task": "cifar10"}, "--task cifar10 needs --model"),
        ({"num_classes": 21}, "has 5 classes"),
        ({"image_size": 8}, "--image-size must be >= 16"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate(_seg(**overrides))
    unet = PRESETS["shapes-seg-unet"]
    with pytest.raises(ConfigError, match="--backbone is for"):
        validate(with_overrides(unet, {"backbone": "timm:mobilenetv2_050"}))
    with pytest.raises(ConfigError, match="--no-separable-aspp is for"):
        validate(with_overrides(unet, {"separable_aspp": False}))


def test_flags_reach_the_model_kwargs():
    cfg = _seg(separable_aspp=False).model
    kwargs = zoo_model.model_kwargs(cfg)
    assert kwargs["backbone"] == "timm:mobilenetv2_050" and kwargs["separable_aspp"] is False
    assert kwargs["num_classes"] == 5
    conflicting = dataclasses.replace(cfg, model_kwargs='{"backbone": "torchvision:mobilenet_v2"}')
    with pytest.raises(ConfigError, match="disagrees with --backbone"):
        zoo_model.model_kwargs(conflicting)
    unet = dataclasses.replace(PRESETS["shapes-seg-unet"].model, separable=False)
    assert zoo_model.model_kwargs(unet)["separable"] is False


def test_no_separable_aspp_builds_regular_convs():
    from jaxdsc.conv import Conv, DepthwiseConv

    def kinds(separable_aspp: bool) -> set[type]:
        cfg = dataclasses.replace(_seg().model, separable_aspp=separable_aspp)
        model = nnx.eval_shape(lambda: zoo_model.build(cfg, 0))
        return {type(m) for _, m in nnx.iter_graph(model.aspp) if isinstance(m, (Conv, DepthwiseConv))}

    assert DepthwiseConv in kinds(True)
    assert kinds(False) == {Conv}  # dense 3x3 atrous branches; 1x1 convs are PointwiseConv


def test_unet_takes_unit_images_deeplab_normalised_input():
    unet = nnx.eval_shape(lambda: zoo_model.build(PRESETS["shapes-seg-unet"].model, 0))
    assert zoo_model.input_norm(PRESETS["shapes-seg-unet"].model, unet) is None
    deeplab = nnx.eval_shape(lambda: zoo_model.build(_seg().model, 0))
    assert zoo_model.input_norm(_seg().model, deeplab) == (zoo_model.IMAGENET_MEAN, zoo_model.IMAGENET_STD)


@pytest.mark.parametrize("padding", [0, 3])
def test_augment_moves_image_and_labels_together(padding):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 12, 10)).astype(np.uint8)
    labels[:, 0, 0] = seg_data.IGNORE_INDEX
    # Channel 0 is 10 * label + 1 (never 0, the crop's padding value); channels 1, 2 noise.
    images = np.stack([labels * 10 + 1, *rng.integers(0, 256, (2, 6, 12, 10))], -1).astype(np.uint8)
    for seed in range(3):
        x, y = seg_steps.augment_pair(jnp.asarray(images), jnp.asarray(labels), jax.random.key(seed),
                                      padding=padding, flip=True)
        x, y = np.asarray(x), np.asarray(y)
        code = np.round(x[..., 0] * 255).astype(np.int64)
        padded = code == 0
        assert not padding or padded.any()
        assert np.all(y[padded] == seg_data.IGNORE_INDEX)  # padding is never scored
        real = ~padded & (y != seg_data.IGNORE_INDEX)
        np.testing.assert_array_equal(code[real], 10 * y[real].astype(np.int64) + 1)
        # Every label that arrives is one of the image's: a crop/flip, nothing invented.
        assert real.sum() > 0.5 * y.size


def test_pixel_loss_equals_torch_ignore_index():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 5, 7))
    labels[rng.random(labels.shape) < 0.3] = seg_data.IGNORE_INDEX
    total, count = seg_steps.pixel_loss(jnp.asarray(logits), jnp.asarray(labels), 5)
    ref = torch.nn.CrossEntropyLoss(ignore_index=seg_data.IGNORE_INDEX)(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels))
    assert int(count) == int((labels != seg_data.IGNORE_INDEX).sum())
    # float32 sums of ~50 terms: a few ulps of the mean.
    np.testing.assert_allclose(float(total / count), float(ref), rtol=1e-6)


def test_eval_step_confusion_matches_numpy_and_masks_padding():
    cfg = dataclasses.replace(PRESETS["shapes-seg-unet"].model, model_kwargs='{"width": 4, "depth": 1}', impl="xla")
    model = zoo_model.build(cfg, 0)
    import optax

    from train.steps import init_state, split_model

    _, graph_eval, params, stats, consts = split_model(model)
    state = init_state(params, stats, consts, optax.sgd(0.1), seed=0, ema=False)
    images, labels = seg_data.generate(3, split="test", size=32)
    mask = np.array([1.0, 1.0, 0.0], np.float32)  # the third is batch padding
    out = jax.jit(seg_steps.make_eval_step(graph_eval, 5))(
        state, {"image": jnp.asarray(images), "label": jnp.asarray(labels), "mask": jnp.asarray(mask)})
    preds = np.asarray(seg_steps.predict(graph_eval, state, jnp.asarray(images)))
    ref = seg_metrics.confusion_matrix(labels[:2], preds[:2], 5)
    np.testing.assert_array_equal(np.asarray(out["confusion"]), ref)
    assert float(out["count"]) == ref.sum()
    assert float(out["correct"]) == np.trace(ref)


@pytest.mark.slow
def test_unet_run_export_same_miou_in_torch_and_workdir_tools(tmp_path):
    import torch_bridge
    from jaxdsc.summary import summary as model_summary
    from train.cli import main
    from train.export import export_workdir

    work, out = tmp_path / "run", tmp_path / "unet.safetensors"
    args = ["--preset", "shapes-seg-unet", "--model-kwargs", '{"width": 4, "depth": 1, "dilations": [2]}',
            "--image-size", "32",
            "--train-limit", "32", "--test-limit", "12", "--batch-size", "8", "--epochs", "2",
            "--eval-batch-size", "8", "--workdir", str(work), "--no-progress", "--export-torch", str(out)]
    assert main(args) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["task"] == "shapes-seg" and summary["metric"] == "mIoU"
    assert summary["test_metric"] == summary["test_miou"] and 0 <= summary["test_miou"] <= 1
    assert len(summary["test_iou"]) == 5 and summary["pixel_accuracy"] == summary["test_accuracy"]
    assert "input_mean" not in summary  # the U-Net normalises its [0, 1] input itself
    assert (work / "predictions.png").stat().st_size > 0 and (work / "curves.png").is_file()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [2] and "test_miou" in records[0]  # eval_every 2

    # The exported file in PyTorch: the same mIoU over the same test images.
    twin = torch_bridge.load(out, framework="torch").eval()
    images, labels = seg_data.generate(12, split="test", size=32)
    with torch.no_grad():
        preds = twin(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    mat = seg_metrics.confusion_matrix(labels, preds, 5)
    # float32 logits differ by ~1e-6 between XLA and PyTorch; a near-tie could flip a pixel, which
    # moves the mIoU by ~1e-4 at most on these 12x32x32 pixels. Equal here.
    assert seg_metrics.metrics(mat)["mean_iou"] == pytest.approx(summary["test_miou"], abs=1e-4)

    jm = torch_bridge.load(out)
    assert summary["macs"] == model_summary(jm, (1, 32, 32, 3)).total_macs

    # `jaxdsc-train export WORKDIR`: the same tensors as --export-torch.
    again = tmp_path / "again.safetensors"
    export_workdir(work, again)
    a, b = torch_bridge.read(out), torch_bridge.read(again)
    assert a.name == b.name == "UNet" and a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k])

    # --init-from WORKDIR of a zoo model: starts from the run's weights.
    from train.model import initial_model

    cfg = dataclasses.replace(ModelConfig(), **{**json.loads((work / "config.json").read_text())["model"],
                                                "init_from": str(work)})
    model, note = initial_model(cfg, seed=5)
    assert "jaxdsc-train workdir" in note
    from torch_bridge.convert import torch_state_dict

    got = torch_state_dict(model)
    for k in a.tensors:
        np.testing.assert_array_equal(got[k], a.tensors[k])
    wrong = dataclasses.replace(cfg, model="jaxdsc:deeplabv3plus", model_kwargs="")
    with pytest.raises(ConfigError, match="expected jaxdsc:deeplabv3plus"):
        initial_model(wrong, seed=0)
