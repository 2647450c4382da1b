"""Training faults at small counts (``scripts/faults.py`` runs the same trials at full counts).

The trials live in ``scripts/_faults_lib.py`` (trainer) and ``_faults_files.py``: kill -9 / SIGTERM at a seeded
random step and rerun (bit-exact, data order, one trace per process), a crash
in each stage of a save (process exit through the trainer, exception through
the checkpointer), keep-N, a skipped NaN batch, and a checkpoint restored
into a state of another shape or dtype. One uninterrupted reference run is
shared by every xdist worker.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import _faults_files as files
import _faults_lib as lib

from train import faults


@pytest.fixture(scope="module")
def env(session_shared_dir) -> lib.Env:
    env = lib.Env(session_shared_dir / "faults_env")
    env.root.mkdir(exist_ok=True)
    with FileLock(str(env.root) + ".lock"):
        env.prepare()
    return env


def assert_ok(trial: lib.Trial) -> None:
    assert trial.ok, trial.detail


def test_reference_run_is_what_the_trials_assume(env):
    assert lib.committed(env.reference) == list(lib.SAVED)
    assert sorted(env.ref_batches()) == list(range(1, lib.TOTAL + 1))
    summary = json.loads((env.reference / "summary.json").read_text())
    assert summary["steps"] == lib.TOTAL and summary["train_step_traces"] == 1


def test_kill_at_a_random_step_then_rerun_is_bit_exact(env, tmp_path):
    step = random.Random(1).randint(1, lib.TOTAL)
    workdir = tmp_path / "killed"
    assert_ok(lib.kill_trial(env, workdir, step))
    assert_ok(lib.check_data_order(env, workdir))  # the resumed run trains on the same batches
    segments = lib.read_trace(workdir)
    assert segments[0].exit_traces is None and segments[1].start <= step  # killed, then resumed
    assert_ok(lib.check_traced_once(segments))  # no recompilation in the resumed process
    assert json.loads((workdir / "summary.json").read_text())["train_step_traces"] == 1


def test_sigterm_at_a_random_step_exits_0_fast_saved_and_resumes_bit_exactly(env, tmp_path):
    step = random.Random(2).randint(1, lib.TOTAL - 1)
    workdir = tmp_path / "termed"
    trial = lib.sigterm_trial(env, workdir, step)
    assert_ok(trial)
    assert trial.figures["exit_s"] <= lib.SIGTERM_LIMIT_S
    assert_ok(lib.check_data_order(env, workdir))
    segments = lib.read_trace(workdir)
    assert [s.start for s in segments] == [0, step]  # resumed exactly at the step it saved
    assert_ok(lib.check_traced_once(segments))


@pytest.mark.parametrize("stage", ["write", "finalize"])  # "rename": tests/test_train_run.py
def test_process_exit_while_saving(env, tmp_path, stage):
    step = {"write": 6, "finalize": 3}[stage]  # early: short runs
    assert_ok(lib.crash_trial(env, tmp_path / stage, stage, "exit", step))


@pytest.mark.parametrize("stage", lib.STAGES)
def test_exception_while_saving(tmp_path, stage):
    assert_ok(files.checkpointer_error_trial(tmp_path / "ckpt", stage))


def test_error_actions_parse():
    parsed = faults.parse("error-write@3,error-finalize@4-5,crash-rename@2")
    assert [f.action for f in parsed] == ["error-write", "error-finalize", "crash-rename"]
    assert issubclass(faults.InjectedFault, OSError)


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_n_after_many_saves(tmp_path, keep):
    assert_ok(files.keep_n_trial(tmp_path / "ckpt", keep, saves=12))


def test_one_nan_batch_is_skipped_without_changing_the_state(env, tmp_path):
    step = random.Random(3).randint(2, lib.TOTAL)
    assert_ok(lib.nan_skip_trial(env, tmp_path / "nan", step, finish=False))


def test_restore_into_another_shape_or_dtype_fails_naming_it(tmp_path):
    from train.checkpointing import flatten

    arrays = {k: v.__array__() for k, v in flatten(files.small_state(1)).items()}
    trials = files.mismatch_trials(arrays, tmp_path / "ckpt")
    assert len(trials) == 2 * len(arrays)
    for trial in trials:
        assert_ok(trial)


def test_torch_bridge_refuses_another_shape_or_dtype_naming_it():
    trials = files.torch_bridge_mismatch_trials(limit=8)  # all tensors: scripts/faults.py
    assert len(trials) == 16
    for trial in trials:
        assert_ok(trial)
