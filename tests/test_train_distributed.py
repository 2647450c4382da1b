"""train.distributed: what the trainer passes to jax.distributed.initialize, and imports that start no backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import cli, distributed
from train.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str):
    return cli.parse(["--workdir", "w", *argv])[0].run


@pytest.mark.parametrize(("argv", "env", "want"), [
    ((), {}, None),
    (("--distributed",), {}, {}),  # nothing given: JAX detects (SLURM, TPU VMs)
    ((), {"JAXDSC_DISTRIBUTED": "1"}, {}),
    ((), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "h:1", "num_processes": 4, "process_id": 2}),
    (("--coordinator-address", "a:9", "--num-processes", "2", "--process-id", "1"),
     {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},  # flags win
     {"coordinator_address": "a:9", "num_processes": 2, "process_id": 1}),
    (("--process-id", "0"), {"JAX_NUM_PROCESSES": "3"}, {"num_processes": 3, "process_id": 0}),
])
def test_initialize_args_from_flags_then_environment(argv, env, want):
    run = _run(*argv)
    got = distributed.initialize_args(run, env) if distributed.requested(run, env) else None
    assert got == want


@pytest.mark.parametrize(("env", "match"), [
    ({"JAX_NUM_PROCESSES": "two"}, r"\$JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_NUM_PROCESSES": "0"}, r"\$JAX_NUM_PROCESSES=0 must be >= 1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "process id 2 .* must be below the process count 2"),
])
def test_bad_environment_is_one_config_error(env, match):
    with pytest.raises(ConfigError, match=match):
        distributed.initialize_args(RunConfig(distributed=True), env)


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--num-processes", "2", "--process-id", "2"])
    assert e.value.code == 2 and "--process-id 2 must be below --num-processes 2" in capsys.readouterr().err


def test_maybe_initialize_passes_the_values_explicitly(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAXDSC_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.maybe_initialize(RunConfig()) is None and calls == []
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    distributed.maybe_initialize(RunConfig(coordinator_address="127.0.0.1:5", num_processes=2))
    assert calls == [{"coordinator_address": "127.0.0.1:5", "num_processes": 2, "process_id": 1}]


def test_what_jax_cannot_detect_is_reported_with_the_flags_to_pass(monkeypatch):
    import jax

    def fail(**kw):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(ConfigError, match=r"given: coordinator_address=h:1\. .*--num-processes N --process-id I"):
        distributed.maybe_initialize(RunConfig(coordinator_address="h:1"))


def test_importing_train_starts_no_backend():
    # In a fresh process: jax.distributed.initialize must still be possible after these imports.
    code = """
import importlib, pkgutil, train
names = [m.name for m in pkgutil.iter_modules(train.__path__) if m.name != "__main__"]
for name in names:
    importlib.import_module("train." + name)
from jax._src import xla_bridge
assert not xla_bridge.backends_are_initialized(), "a backend started at import"
print(len(names))
"""
    env = {k: v for k, v in os.environ.items() if k != "JAXDSC_DISABLE_NATIVE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) >= 15  # every module of train/ was imported
