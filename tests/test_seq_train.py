"""``python -m train --task ...``: the sequence-task loop end to end on tiny data (seconds).

Checks the workdir contract (summary.json with task / metric / test_metric,
metrics.jsonl, resume, --export-torch) rather than accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io

import torch_bridge
from train import cli

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
    # rerun: resumes from the final checkpoint, trains nothing, same records
    assert cli.main(args) == 0
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert again == records


def test_task_model_mismatch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--task", "adding"])
    assert e.value.code == 2
    assert "--model tcn" in capsys.readouterr().err
