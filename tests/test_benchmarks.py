"""Smoke tests of the benchmark scripts: they run, agree with PyTorch, and write what they promise.

Timings are never asserted (machines are noisy); these tests check that the
scripts behind BENCHMARKS.md still work end to end on tiny settings: the
layer benchmark and its table rebuild, the GPU script's own steps (run on CPU
with ``DEVICE=cpu``), the training-step benchmark's JAX-vs-PyTorch loss
check, and the C++ GEMM-vs-FMA-peak driver's own result check. Each runs in a subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# One small shape, one kind and mode, one short round: seconds, not minutes.
TINY_LAYERS = [
    "--shapes", "c256_d4", "--kinds", "dw", "--modes", "fwd", "--no-flax", "--no-roofline",
    "--rounds", "1", "--block-s", "0.01",
]


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _check_layer_json(path: Path) -> dict:
    results = json.loads(path.read_text())
    (row,) = results["rows"]
    assert (row["shape"]["name"], row["kind"], row["mode"]) == ("c256_d4", "dw", "fwd")
    # The candidates the tables compare: ours and both PyTorch layouts.
    assert {"jaxdsc", "torch_nchw", "torch_cl"} <= set(row["timings"])
    for timing in row["timings"].values():
        assert timing["median_ms"] > 0 and timing["calls_per_block"] >= 1
    return results


def test_layers_benchmark_runs_and_tables_rebuild(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "layers.json", tmp_path / "layers.md"
    _run([sys.executable, str(BENCH / "layers.py"), *TINY_LAYERS,
          "--json", str(out_json), "--markdown", str(out_md)])
    _check_layer_json(out_json)
    table = out_md.read_text()
    assert "| c256_d4 |" in table and "jaxdsc / best torch" in table
    # --from-json rebuilds the same tables without timing anything.
    rebuilt = tmp_path / "rebuilt.md"
    _run([sys.executable, str(BENCH / "layers.py"), "--from-json", str(out_json),
          "--markdown", str(rebuilt)])
    assert rebuilt.read_text() == table


def test_gpu_script_steps_run_on_cpu(tmp_path: Path) -> None:
    prefix = tmp_path / "gpu_dry"
    proc = _run(["bash", str(BENCH / "gpu.sh"), *TINY_LAYERS],
                DEVICE="cpu", INSTALL="never", OUT=str(prefix), PYTHON=sys.executable)
    assert f"wrote {prefix}.json" in proc.stdout
    results = _check_layer_json(prefix.with_suffix(".json"))
    assert results["args"]["device"] == "cpu"


@pytest.mark.parametrize(("var", "value"), [("DEVICE", "tpu"), ("INSTALL", "sometimes")])
def test_gpu_script_rejects_bad_settings(var: str, value: str) -> None:
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, var: value}, timeout=60)
    assert proc.returncode == 2
    assert var in proc.stderr and value in proc.stderr


def test_train_step_benchmark_matches_pytorch(tmp_path: Path) -> None:
    out_json = tmp_path / "train_step.json"
    _run([sys.executable, str(BENCH / "train_step.py"), "--width", "8", "--depth", "1",
          "--batch-size", "16", "--rounds", "1", "--block-s", "0.01", "--check-steps", "2",
          "--json", str(out_json)])
    results = json.loads(out_json.read_text())
    (cfg,) = results["configs"]
    # The benchmark's own check: same losses and parameters as the PyTorch loop
    # built from torch_bridge modules, within the tolerances it states.
    assert results["ok"] and cfg["sanity"]["ok"]
    assert cfg["sanity"]["max_abs_loss_diff"] <= cfg["sanity"]["loss_tolerance"]
    assert len(cfg["sanity"]["jax_losses"]) == 2
    assert cfg["images_per_second"]["jax_train"] > 0


def test_stream_reference_patterns() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from _harness import stream_reference
    finally:
        sys.path.remove(str(BENCH))
    for pattern in ("inplace", "copy"):
        call = stream_reference(1 << 16, pattern)
        call()
        call()  # the donated buffer is replaced by the result: a second call must work too
    with pytest.raises(ValueError, match="pattern must be 'inplace' or 'copy', got 'memcpy'"):
        stream_reference(1 << 16, "memcpy")


def _has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))


@pytest.mark.skipif(shutil.which("g++") is None or not _has_avx512(),
                    reason="needs g++ and an AVX-512 CPU")
def test_pw_kernel_driver_checks_its_gemm(tmp_path: Path) -> None:
    exe = tmp_path / "pw_kernel"
    subprocess.run(["g++", "-O2", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno",
                    f"-I{ROOT / 'csrc'}", str(BENCH / "pw_kernel.cc"), "-o", str(exe), "-pthread"],
                   check=True, capture_output=True, timeout=300)
    # Odd sizes: a partial last row block and a second, zero padded column
    # panel; the driver exits 3 if the timed GEMM's result is wrong.
    proc = _run([str(exe), "1000", "70", "2", "3"])
    assert re.search(r"GEMM [\d.]+ us .* GEMM at [\d.]+% of peak", proc.stdout), proc.stdout
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
