"""The multi-host launch scripts' dry runs: the command they would run, and its flags parsed by the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "train" / "scripts"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts are bash")


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "COORD", "NUM_HOSTS", "HOST_ID"))}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**clean, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=120, check=False)


def _split(out: str) -> tuple[str, dict]:
    command, _, config = out.partition("\n")
    return command, json.loads(config)


def test_multi_host_gpu_passes_coordinator_count_and_id_as_flags(tmp_path):
    r = _dry_run("multi_host_gpu.sh", "--epochs", "3", COORD="10.0.0.1:1234", NUM_HOSTS="4", HOST_ID="3",
                 WORKDIR=str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    command, cfg = _split(r.stdout)
    assert command.startswith("python -m train --preset cifar10 --distributed --coordinator-address 10.0.0.1:1234 "
                              "--num-processes 4 --process-id 3 ")
    assert cfg["run"]["coordinator_address"] == "10.0.0.1:1234"
    assert (cfg["run"]["num_processes"], cfg["run"]["process_id"], cfg["run"]["distributed"]) == (4, 3, True)
    assert cfg["optim"]["epochs"] == 3 and cfg["run"]["workdir"] == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize(("missing", "message"), [("COORD", "host:port of host 0"), ("HOST_ID", "HOST_ID"),
                                                   ("WORKDIR", "shared directory")])
def test_multi_host_gpu_names_what_is_missing(tmp_path, missing, message):
    env = {"COORD": "h:1", "NUM_HOSTS": "2", "HOST_ID": "0", "WORKDIR": str(tmp_path)}
    del env[missing]
    r = _dry_run("multi_host_gpu.sh", **env)
    assert r.returncode != 0 and message in r.stderr and not r.stdout


def test_multi_host_gpu_refuses_an_id_outside_the_count(tmp_path):
    r = _dry_run("multi_host_gpu.sh", COORD="h:1", NUM_HOSTS="2", HOST_ID="2", WORKDIR=str(tmp_path))
    assert r.returncode == 2 and "--process-id 2 must be below --num-processes 2" in r.stderr


def test_tpu_pod_leaves_detection_to_jax(tmp_path):
    r = _dry_run("tpu_pod.sh", "--epochs", "2", WORKDIR=str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    command, cfg = _split(r.stdout)
    assert "--distributed" in command and "--coordinator-address" not in command
    assert cfg["run"]["distributed"] and cfg["run"]["coordinator_address"] == ""
    assert (cfg["run"]["num_processes"], cfg["run"]["process_id"]) == (0, -1)
    assert (cfg["optim"]["batch_size"], cfg["optim"]["epochs"]) == (1024, 2)
