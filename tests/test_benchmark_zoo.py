"""benchmarks/zoo.py runs at tiny sizes, checks its jaxdsc and PyTorch sides agree, writes its rows.

No timing is asserted. One small model, batch 2, 32x32, one round: the cost is compiling the
jitted forward and train step. At 32x32 MobileNetV2's last maps are 1x1, so train-mode BatchNorm
normalises over 2 values per channel and float32 roundoff is amplified (first-step losses differ
by up to ~3e-3 relative here, ~1e-6 at batch 4, 64x64; tests/_zoo_checks.py proves train-mode
parity in float64): ``--loss-rtol 0.05`` still catches a wrong function (errors of order 1).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torchvision")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_zoo", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zoo_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    assert _module().main(["--models", "torchvision:mobilenet_v2", "--batch", "2", "--size", "32",
                           "--rounds", "1", "--block-s", "0.001", "--warmup", "1", "--threads", "1",
                           "--loss-rtol", "0.05", "--also-old-dense", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [("torchvision:mobilenet_v2", m) for m in ("eval", "train")]
    for r in rows:
        assert r["jaxdsc_ips"] > 0 and r["torch_ips"] > 0 and r["torch_layout"] in ("NCHW", "channels_last")
        assert r["eval_rel_err"] <= 1e-4 and r["train_loss_rel_err"] <= 0.05
        # --also-old-dense: a second model traced without the native dense kernel, in the same rounds
        assert {"jaxdsc", "jaxdsc_old_dense", "torch_nchw", "torch_cl"} == set(r["timings"])
        assert r["old_dense_ips"] > 0
    table = capsys.readouterr().out
    assert "| torchvision:mobilenet_v2 | train |" in table and "jaxdsc / torch" in table


def test_zoo_benchmark_rejects_unknown_model():
    with pytest.raises(SystemExit) as e:
        _module().main(["--models", "torchvision:resnet50"])
    assert e.value.code == 2
