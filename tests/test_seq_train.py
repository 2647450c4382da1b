"""``python -m train --task ...``: the sequence-task loop end to end on tiny data (seconds).

Checks the workdir contract (summary.json with task / metric / test_metric,
metrics.jsonl, resume, --export-torch) rather than accuracy.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_bridge
from train import cli, seq_data

TINY = ["--channels", "4", "4", "--kernel-size", "2", "--epochs", "2", "--batch-size", "8", "--no-progress",
        "--no-plot"]


def _mat(path):
    rng = np.random.default_rng(0)
    cells = {}
    for split, lengths in (("train", [9, 12, 7, 10, 8, 11, 9, 6]), ("valid", [8, 5]), ("test", [7, 9])):
        arr = np.empty((1, len(lengths)), dtype=object)
        for i, t in enumerate(lengths):
            arr[0, i] = (rng.random((t, 88)) < 0.1).astype(np.uint8)
        cells[f"{split}data"] = arr
    scipy.io.savemat(str(path), cells)


def _assert_twin_scores(export, test_metric):
    """The exported twin's full forward, read at the last step, scores the trainer's adding ``test_metric``
    (tiny set: 16 test sequences of T=12, seed 0); rel 1e-5: float32 sums in another order."""
    gen = seq_data.generate("adding", n_train=32, n_test=16, length=12, seed=0)
    twin = torch_bridge.load(export, framework="torch").eval()
    with torch.no_grad():
        pred = twin(torch.from_numpy(np.ascontiguousarray(gen.test_x.transpose(0, 2, 1))))[:, 0, -1].numpy()
    mse = float(np.mean((pred - gen.test_y) ** 2))
    assert abs(mse - test_metric) <= 1e-5 * mse, (mse, test_metric)


@pytest.mark.parametrize("task", ["adding", "copy", "music-jsb"])
def test_task_runs_resumes_and_exports(task, tmp_path):
    args = ["--preset", task, *TINY, "--workdir", str(tmp_path / "run")]
    if task == "music-jsb":
        _mat(tmp_path / "JSB_Chorales.mat")
        args += ["--data-dir", str(tmp_path)]
    else:
        args += ["--train-limit", "32", "--test-limit", "16", "--seq-length", "12"]
    export = tmp_path / "tcn.safetensors"
    assert cli.main([*args, "--export-torch", str(export)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == task
    assert summary["metric"] == {"adding": "mse", "copy": "cross_entropy", "music-jsb": "nll"}[task]
    assert np.isfinite(summary["test_metric"]) and summary["params"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    if task == "music-jsb":
        best = min(records, key=lambda r: r["valid_loss"])
        assert summary["test_metric"] == best["test_loss"]
    model = torch_bridge.load(export, framework="jax")
    assert model.channels == (4, 4)
    if task == "adding":
        # The trainer computes the last step alone (TCN.last); the exported twin's full forward scores the same.
        _assert_twin_scores(export, summary["test_metric"])
    # rerun: resumes from the final checkpoint, trains nothing, same records
    assert cli.main(args) == 0
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert again == records


def test_ema_weights_are_the_ones_evaluated_exported_and_checkpointed(tmp_path):
    """``--ema-decay`` on a sequence task: the EMA weights score ``test_metric`` and are exported (the
    twin's full forward scores the same), the live weights differ, and both live in the checkpoint."""
    from train.seq_loop import SeqTrainer

    run, export = tmp_path / "run", tmp_path / "tcn.safetensors"
    args = ["--preset", "adding", *TINY, "--train-limit", "32", "--test-limit", "16", "--seq-length", "12",
            "--ema-decay", "0.9", "--lr", "0.01", "--workdir", str(run)]
    assert cli.main([*args, "--export-torch", str(export)]) == 0
    summary = json.loads((run / "summary.json").read_text())

    trainer = SeqTrainer(cli.parse(args)[0])
    assert trainer.resume()
    ema, live = trainer.state.ema["params"], trainer.state.params
    gaps = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(live), strict=True)]
    assert max(gaps) > 1e-4, gaps  # 8 steps at decay <= 0.9 keep the average away from the live weights
    assert trainer.evaluate("test") == summary["test_metric"]
    trainer.state = trainer.state.replace(ema=None)
    assert trainer.evaluate("test") != summary["test_metric"]
    _assert_twin_scores(export, summary["test_metric"])


def test_task_model_mismatch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--task", "adding"])
    assert e.value.code == 2
    assert "--model tcn" in capsys.readouterr().err


def test_dense_stem_is_for_the_tcn_only():
    from train.config import PRESETS, ConfigError, validate

    cfg = PRESETS["tiny"]
    with pytest.raises(ConfigError, match="--dense-stem is for --model tcn, got --model dscnet"):
        validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dense_stem=True)))


PAPER_PARAMS = {"adding": 70_000, "copy": 16_000, "music-jsb": 300_000, "music-nottingham": 1_000_000}


@pytest.mark.parametrize("task", sorted(PAPER_PARAMS))
def test_sequence_presets_and_their_dense_references(task):
    """Each task preset is a separable TCN within the paper's parameter count (issue 17); its "-dense"
    preset is the same run (data, optimiser, schedule) with dense convs of about the same size."""
    from flax import nnx

    from train.config import PRESETS, validate
    from train.seq_loop import build_tcn

    sep, dense = validate(PRESETS[task]), validate(PRESETS[task + "-dense"])
    assert sep.data.task == dense.data.task == task
    assert sep.model.separable and not dense.model.separable
    assert sep.optim == dense.optim and sep.data == dense.data
    assert dataclasses.replace(dense.model, separable=True, channels=sep.model.channels) == sep.model

    def params(cfg):
        m = nnx.eval_shape(lambda: build_tcn(task, cfg.model, rngs=nnx.Rngs(0)))
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))

    n_sep, n_dense = params(sep), params(dense)
    assert n_sep <= PAPER_PARAMS[task]
    assert 0.85 < n_dense / n_sep < 1.3, (n_sep, n_dense)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), max_size=30))
def test_plateau_rule_is_locuslab_music_test(valid):
    """``plateau_decays`` after each epoch decays exactly where locuslab/TCN music_test.py's loop does
    (``if ep > 10 and vloss > max(vloss_list[-3:])``, ep counted from 1)."""
    from train.optim import plateau_decays

    history, expected = [], []
    for ep, vloss in enumerate(valid, start=1):
        expected.append(ep > 10 and vloss > max(history[-3:]))
        history.append(vloss)
    assert [plateau_decays(valid[:i]) for i in range(1, len(valid) + 1)] == expected


def test_plateau_schedule_lowers_the_rate_and_resumes_at_it(tmp_path, monkeypatch, capsys):
    """A decay after epoch 2 (the rule forced there) trains epochs 3-4 at lr / 10; rerunning from the
    epoch-2 checkpoint reproduces them bit for bit: the factor lives in the optimizer state."""
    import shutil

    from train import optim

    monkeypatch.setattr(optim, "plateau_decays", lambda valid: len(valid) == 2)
    _mat(tmp_path / "JSB_Chorales.mat")
    run = tmp_path / "run"
    args = ["--preset", "music-jsb", *TINY, "--epochs", "4", "--schedule", "plateau", "--lr", "0.01",
            "--data-dir", str(tmp_path), "--workdir", str(run), "--keep-checkpoints", "4"]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.01, 0.001, 0.001], rel=1e-6)
    steps_per_epoch = records[0]["step"]
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        if int(ckpt.name.removeprefix("step_")) > 2 * steps_per_epoch:
            shutil.rmtree(ckpt)
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert f"resuming at step {2 * steps_per_epoch}" in capsys.readouterr().out
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("train_seconds", "sequences_per_second")}  # noqa: E731
                        for r in rs]
    assert strip(again) == strip(records)


@pytest.mark.parametrize("extra", [["--preset", "adding"], ["--preset", "music-jsb", "--eval-every", "2"],
                                   ["--preset", "cifar10-cpu"]])
def test_plateau_schedule_needs_a_validation_split_every_epoch(extra, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse([*extra, "--schedule", "plateau"])
    assert e.value.code == 2
    assert "--schedule plateau reads the validation loss of every epoch" in capsys.readouterr().err
