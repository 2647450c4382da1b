"""benchmarks/tcn.py runs at tiny sizes and checks its JAX and torch sides agree (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tcn.py"


def test_tcn_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_tcn", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tcn.json"
    assert mod.main(["--lengths", "40", "--levels", "2", "--channels", "4", "--batch", "2", "--rounds", "1",
                     "--block-s", "0.001", "--threads", "1", "--also-policy", "xla", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kind"], r["mode"]) for r in rows} == {(k, m) for k in ("separable", "dense")
                                                      for m in ("forward", "step")}
    assert all(r["jax_ms"] > 0 and r["torch_ms"] > 0 and r["policy_ms"] > 0 for r in rows)


def test_tcn_benchmark_presets_time_the_trainer_presets(tmp_path, monkeypatch):
    """--presets builds each preset's model and its -dense reference as the trainer does (params match)."""
    spec = importlib.util.spec_from_file_location("bench_tcn_presets", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.PRESET_LENGTH, "copy", 24)  # the real T=1020 takes seconds per step
    out = tmp_path / "tcn.json"
    assert mod.main(["--presets", "copy", "--rounds", "1", "--block-s", "0.001", "--threads", "1",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["kind"], r["mode"], r["batch"], r["T"]) for r in rows] == [
        ("copy", "separable", "step", 32, 24), ("copy-dense", "dense", "step", 32, 24)]
    # the parameter counts of the trainer's summary.json for these presets
    assert [r["params"] for r in rows] == [13498, 12530]  # copy: the dense stem
    assert all(r["jax_seq_per_s"] > 0 and r["torch_seq_per_s"] > 0 for r in rows)


def test_tcn_benchmark_rejects_unknown_preset():
    spec = importlib.util.spec_from_file_location("bench_tcn_bad", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="'cifar10' is not a sequence preset"):
        mod.main(["--presets", "cifar10"])
