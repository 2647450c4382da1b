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


def test_gpu_script_runs_the_layers_benchmark_and_its_tables_rebuild(tmp_path: Path) -> None:
    # One layers.py run serves both checks: gpu.sh's own steps (on CPU with DEVICE=cpu) end in
    # layers.py --json/--markdown with the tiny arguments, the same run a direct call would make
    # (a separate direct run cost another ~20 s of process start and compiles under load).
    prefix = tmp_path / "gpu_dry"
    proc = _run(["bash", str(BENCH / "gpu.sh"), *TINY_LAYERS],
                DEVICE="cpu", INSTALL="never", OUT=str(prefix), PYTHON=sys.executable)
    assert f"wrote {prefix}.json" in proc.stdout
    out_json, out_md = prefix.with_suffix(".json"), prefix.with_suffix(".md")
    results = _check_layer_json(out_json)
    assert results["args"]["device"] == "cpu"
    table = out_md.read_text()
    assert "| c256_d4 |" in table and "jaxdsc / best torch" in table
    # --from-json rebuilds the same tables without timing anything.
    rebuilt = tmp_path / "rebuilt.md"
    _run([sys.executable, str(BENCH / "layers.py"), "--from-json", str(out_json),
          "--markdown", str(rebuilt)])
    assert rebuilt.read_text() == table


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
          "--image-size", "16",  # a --train-sizes phase: both frameworks downscale the batch
          "--precision", "float32",  # the sanity check compares float32 (the preset: bf16-matmul)
          # One torch thread (the suite's setting, see conftest): two spin-waiting OpenMP threads on a
          # busy 2-core machine stall; a small eval batch: the smoke test times nothing it asserts.
          "--threads", "1", "--eval-batch", "64", "--json", str(out_json)])
    results = json.loads(out_json.read_text())
    (cfg,) = results["configs"]
    # The benchmark's own check: same losses and parameters as the PyTorch loop
    # built from torch_bridge modules, within the tolerances it states.
    assert results["ok"] and cfg["sanity"]["ok"]
    assert cfg["sanity"]["max_abs_loss_diff"] <= cfg["sanity"]["loss_tolerance"]
    assert len(cfg["sanity"]["jax_losses"]) == 2 and cfg["config"]["model"].endswith("at 16x16")
    assert cfg["images_per_second"]["jax_train"] > 0


def test_step_scan_times_each_variant_against_the_first() -> None:
    proc = _run([sys.executable, str(BENCH / "step_scan.py"), "--preset", "tiny", "ref={}",
                 'narrow={"stem_width": 4, "depths": [1, 2, 1]}', "--rounds", "1", "--block-s", "0.01"])
    lines = {ln.split(":")[0].strip(): ln for ln in proc.stdout.splitlines() if " img/s " in ln}
    assert set(lines) == {"ref", "narrow"}
    assert " 1.000x " in lines["ref"] and lines["ref"].endswith("dscnet w8 d1")
    assert "d1-2-1" in lines["narrow"] and "stem4" in lines["narrow"]
    bad = subprocess.run([sys.executable, str(BENCH / "step_scan.py"), "--preset", "tiny", 'x={"nope": 1}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "variant 'x': unknown config field 'nope'" in bad.stderr


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


def test_summarize_cifar_tabulates_seeds_and_their_mean(tmp_path):
    """Three seed workdirs and a one-epoch torch run -> one row each, a mean row, the torch row."""
    cfg = {"optim": {"epochs": 2, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "schedule": "onecycle",
                     "weight_decay": 5e-4, "label_smoothing": 0.1},
           "data": {"train_sizes": [24, 32]}, "model": {"stem_init": "whiten"}}
    runs = []
    for seed, (acc, t90) in enumerate([(0.90, 100.0), (0.92, 80.0), (0.91, None)]):
        w = tmp_path / f"s{seed}"
        w.mkdir()
        (w / "config.json").write_text(json.dumps({**cfg, "run": {"seed": seed}}))
        (w / "summary.json").write_text(json.dumps({
            "model": "dscnet w32 d2", "params": 1000, "macs": 2e6, "tta": "flip", "test_accuracy": acc,
            "test_accuracy_no_tta": acc - 0.01, "time_to_85": 50.0, "time_to_90": t90, "time_to_91": None,
            "train_seconds": 120.0, "images_per_second": 500.0, "loadavg": [2.0, 2.0, 2.0]}))
        (w / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": acc, "train_seconds": 60.0,
                                                     "images_per_second": 500.0}) + "\n")
        runs.append(str(w))
    t = tmp_path / "torch"
    t.mkdir()
    (t / "torch_summary.json").write_text(json.dumps({"test_accuracy": 0.5, "images_per_second": 250.0,
                                                      "epochs": 1, "layout": "channels_last", "threads": 2}))
    out = _run([sys.executable, str(BENCH / "summarize_cifar.py"), "--jax", *runs, "--torch", str(t)]).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 3 + 1 + 1  # header, seeds, mean, torch
    assert "90.00% (89.00%)" in lines[1] and "**2.00**" in lines[1]  # 500 / 250 img/s
    assert "train sizes 24-32, whiten stem" in lines[1]
    mean = lines[4]
    assert "**91.00%** (90.00%)" in mean
    assert "not reached" in mean  # seed 2 never reached 90%: no mean time to 90%
    assert lines[5].count("| - |") >= 1 and "250" in lines[5]  # a 1-epoch torch run: speed only


def test_summarize_seq_table_against_the_paper(tmp_path):
    """Separable and dense workdirs of one task -> rows in task order, paper figures, PyTorch speed joined."""
    def workdir(name, task, separable, params, metric, records, best=None):
        w = tmp_path / name
        w.mkdir()
        (w / "config.json").write_text(json.dumps({"model": {"separable": separable, "channels": [8] * 4,
                                                             "kernel_size": 3}}))
        (w / "summary.json").write_text(json.dumps({
            "task": task, "metric": "nll" if task.startswith("music") else "mse", "test_metric": metric,
            "best_epoch": best, "params": params, "train_seconds": 600.0, "sequences_per_second": 50.0,
            "epochs": len(records)}))
        (w / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "test_loss": v,
                                                             "train_seconds": 300.0 * (i + 1)}) + "\n"
                                                 for i, v in enumerate(records)))
        return str(w)

    runs = [workdir("jsb", "music-jsb", True, 270000, 8.0, [9.0, 8.05], best=2),
            workdir("add-dense", "adding", False, 70000, 1e-3, [0.1, 1e-3]),
            workdir("add", "adding", True, 65000, 4e-5, [0.1, 4e-5])]
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"rows": [
        {"preset": "adding", "params": 65000, "jax_seq_per_s": 200.0, "torch_seq_per_s": 100.0},
        {"preset": "adding-dense", "params": 1, "jax_seq_per_s": 200.0, "torch_seq_per_s": 100.0}]}))
    out = _run([sys.executable, str(BENCH / "summarize_seq.py"), *runs, "--speed", str(speed)]).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")][1:]  # after the header
    assert [ln.split(" | ")[1].split()[0] for ln in lines] == ["separable", "dense", "separable"]
    assert lines[0].startswith("| adding (mse)") and "**4.00e-05**" in lines[0]  # beats the paper's 5.8e-5
    assert "| 10.0 min |" in lines[0] and "100 (jaxdsc 200)" in lines[0]
    assert "| 1.00e-03 |" in lines[1] and lines[1].endswith("| - | 50 | - |")  # never matched; other params
    assert lines[2].startswith("| music-jsb (nll)") and "**8.00**" in lines[2] and "| 8.10 |" in lines[2] and "| 2 (2) |" in lines[2]


def test_summarize_seq_refuses_an_image_workdir(tmp_path):
    w = tmp_path / "c10"
    w.mkdir()
    (w / "summary.json").write_text(json.dumps({"task": "cifar10"}))
    (w / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, str(BENCH / "summarize_seq.py"), str(w)], capture_output=True, text=True)
    assert r.returncode == 2 and "task 'cifar10' is not a sequence task" in r.stderr


def test_summarize_seq_tabulates_a_stopped_run_from_its_last_epoch(tmp_path):
    """No summary.json (stopped by hand): the row comes from metrics.jsonl, params from the config's model."""
    w = tmp_path / "copy-stopped"
    w.mkdir()
    (w / "config.json").write_text(json.dumps({
        "data": {"task": "copy"}, "optim": {"epochs": 25},
        "model": {"separable": True, "channels": [4, 4], "kernel_size": 3, "gated": False}}))
    (w / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "test_loss": v, "train_seconds": 60.0 * e, "sequences_per_second": 100.0}) + "\n"
        for e, v in ((1, 0.03), (2, 0.0204))))
    out = _run([sys.executable, str(BENCH / "summarize_seq.py"), str(w)]).stdout
    row = [ln for ln in out.splitlines() if ln.startswith("| copy")]
    # TCN(1, 10, [4, 4], k=3, separable): level 1 dw 1x3+1, pw 1x4+4, dw 4x3+4, pw 4x4+4, downsample 1x4+4;
    # level 2 twice (dw 4x3+4, pw 4x4+4); linear 4x10+10; weight-norm gains, one per output of each
    # weight-normed kernel: 1+4+4+4 and 4*4
    params = (4 + 8) + (16 + 20) + 8 + 2 * (16 + 20) + 50 + 13 + 16
    assert len(row) == 1 and f"| {params:,} (16K) |" in row[0]
    assert "| 0.0204 |" in row[0] and "2 (stopped after epoch 2 of 25) | 2.0 |" in row[0]
    # the same run with the copy preset's dense stem and dropout: level 1's conv1 is dense (1x3x4 + 4 + 4 gains)
    config = json.loads((w / "config.json").read_text())
    config["model"] |= {"dense_stem": True, "dropout": 0.05}
    (w / "config.json").write_text(json.dumps(config))
    row = [ln for ln in _run([sys.executable, str(BENCH / "summarize_seq.py"), str(w)]).stdout.splitlines()
           if ln.startswith("| copy")]
    stem = params - (4 + 8) - (1 + 4) + (12 + 4 + 4)
    assert len(row) == 1 and f"| {stem:,} (16K) |" in row[0]
    assert "| separable 4 x 2, k3, dense stem, dropout 0.05 |" in row[0]
