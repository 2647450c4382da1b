"""benchmarks/tcn.py runs at tiny sizes and checks its JAX and torch sides agree (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tcn.py"


def test_tcn_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_tcn", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tcn.json"
    assert mod.main(["--lengths", "40", "--levels", "2", "--channels", "4", "--batch", "2", "--rounds", "1",
                     "--block-s", "0.001", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kind"], r["mode"]) for r in rows} == {(k, m) for k in ("separable", "dense")
                                                      for m in ("forward", "step")}
    assert all(r["jax_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
