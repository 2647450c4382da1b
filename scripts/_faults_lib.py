"""Trials of the reliability properties, shared by ``scripts/faults.py`` and ``tests/test_faults.py``.

Every trial returns a :class:`Trial` (``ok`` plus a one-line ``detail``), so the
CI tests (small counts) and the script (full counts) check exactly the same
thing. Training trials run the trainer in a subprocess, as a user would:

    python scripts/_faults_lib.py train ARGS...   ==  python -m train ARGS...

plus a recorder (enabled by ``$JAXDSC_FAULTS_TRACE``) that appends to a JSON
lines file the index batch of every training step, the moment an injected
kill/SIGTERM is sent, and the number of ``train_step`` traces at exit. Faults
are injected with ``$JAXDSC_TRAIN_FAULT`` (:mod:`train.faults`).

All trials of one :class:`Env` share the tiny data set, a persistent XLA
compilation cache (reruns skip compiling) and ONE uninterrupted reference run
(2 epochs x 8 steps, AdamW, EMA, checkpoints every 3 steps, all kept) that the
interrupted runs must reproduce bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRACE_VAR = "JAXDSC_FAULTS_TRACE"
FAULT_VAR = "JAXDSC_TRAIN_FAULT"  # == train.faults.ENV_VAR (not imported: keep this module light)

N_TRAIN, N_TEST, BATCH, EPOCHS, EVERY, KEEP = 128, 32, 16, 2, 3, 3
STEPS_PER_EPOCH = N_TRAIN // BATCH
TOTAL = STEPS_PER_EPOCH * EPOCHS  # 16
SAVED = tuple(sorted({s for s in range(1, TOTAL + 1) if s % EVERY == 0 or s % STEPS_PER_EPOCH == 0}))
STAGES = ("write", "rename", "finalize")
SIGTERM_LIMIT_S = 5.0
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class _Gate:
    """Serialises the in-process work of trials run in threads; opened while one waits on a subprocess."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc: Any) -> None:
        self._owner = None
        self._lock.release()

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        held = self._owner == threading.get_ident()
        if held:
            self._owner = None
            self._lock.release()
        try:
            yield
        finally:
            if held:
                self._lock.acquire()
                self._owner = threading.get_ident()


GATE = _Gate()


@dataclass
class Trial:
    ok: bool
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def _fail(detail: str, **figures: Any) -> Trial:
    return Trial(False, detail, figures)


# ------------------------------------------------------------------ environment
@dataclass
class Env:
    """Data, compilation cache and the uninterrupted reference run under ``root``."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "cifar"

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    def args(self, workdir: Path, *extra: str) -> list[str]:
        return ["--preset", "tiny", "--data-dir", str(self.data), "--workdir", str(workdir), "--no-progress",
                "--no-plot", "--train-limit", "0", "--test-limit", "0", "--batch-size", str(BATCH),
                "--epochs", str(EPOCHS), "--checkpoint-every", str(EVERY), "--keep-checkpoints", str(KEEP),
                "--ema-decay", "0.9", "--eval-batch-size", "32", "--optimizer", "adamw", "--lr", "0.005",
                "--weight-decay", "0.05", *extra]

    def prepare(self) -> None:
        """Write the data and train the reference once (idempotent; callers serialise it)."""
        from train.testing import write_cifar10

        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.data / "cifar-10-batches-bin" / "test_batch.bin").exists():
            write_cifar10(self.data, N_TRAIN, N_TEST)
        if not (self.reference / "summary.json").exists():
            import shutil

            shutil.rmtree(self.reference, ignore_errors=True)
            run = self.train(self.reference, "--keep-checkpoints", "100")
            if run.code != 0:
                raise RuntimeError(f"reference run failed ({run.code}): {run.stderr[-2000:]}")

    def train(self, workdir: Path, *extra: str, fault: str = "", timeout: float = 600) -> Run:
        """Run the trainer (recorded) in a subprocess; the trace goes to ``workdir.trace.jsonl``."""
        env = {k: v for k, v in os.environ.items() if k not in (FAULT_VAR, "XLA_FLAGS", TRACE_VAR)}
        env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
                   JAX_COMPILATION_CACHE_DIR=str(self.root / "xla-cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        env[TRACE_VAR] = str(trace_path(workdir))
        if fault:
            env[FAULT_VAR] = fault
        cmd = [sys.executable, str(Path(__file__).resolve()), "train", *self.args(workdir, *extra)]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with GATE.opened():  # other trial threads may work meanwhile
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            ended = time.time()
        return Run(proc.returncode, out, err, t0, ended)

    # -------------------------------------------------------------- reference data (cached)
    def ref_arrays(self, step: int = TOTAL) -> dict[str, np.ndarray]:
        cache = self.__dict__.setdefault("_arrays", {})
        if step not in cache:
            from train.checkpointing import read_arrays

            cache[step] = read_arrays(self.reference / "checkpoints" / f"step_{step:09d}")[0]
        return cache[step]

    def ref_batches(self) -> dict[int, list[int]]:
        if "_batches" not in self.__dict__:
            segments = read_trace(self.reference)
            self.__dict__["_batches"] = segments[0].batches
        return self.__dict__["_batches"]

    def ref_metrics(self) -> list[dict[str, Any]]:
        return stable_metrics(self.reference)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    started: float
    ended: float


def trace_path(workdir: Path) -> Path:
    return workdir.parent / f"{workdir.name}.trace.jsonl"


@dataclass
class Segment:
    """One process of a run, from its trace: start step, batches by step, events."""

    start: int
    batches: dict[int, list[int]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    exit_traces: int | None = None


def read_trace(workdir: Path) -> list[Segment]:
    segments: list[Segment] = []
    path = trace_path(workdir)
    if not path.exists():
        return segments
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut by a kill
        if rec["event"] == "start":
            segments.append(Segment(rec["step"]))
        elif not segments:
            continue
        elif rec["event"] == "batch":
            seg = segments[-1]
            seg.batches[seg.start + len(seg.batches) + 1] = rec["idx"]
        elif rec["event"] == "exit":
            segments[-1].exit_traces = rec["traces"]
        else:
            segments[-1].events.append(rec)
    return segments


def stable_metrics(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in ("train_seconds", "images_per_second")}
            for line in path.read_text().splitlines()]


def first_difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str | None:
    """None when both flat dicts hold the same keys with bit-identical arrays; else what differs."""
    if sorted(got) != sorted(want):
        return f"keys differ: {sorted(set(got) ^ set(want))[:4]}"
    for key in sorted(want):
        a, b = np.asarray(got[key]), np.asarray(want[key])
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return f"{key} differs"
    return None


def committed(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step_")) if ckpts.is_dir() else []


def leftovers(workdir: Path) -> list[str]:
    ckpts = workdir / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".del-"))) if ckpts.is_dir() else []


def step_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    from train.checkpointing import read_arrays

    return read_arrays(workdir / "checkpoints" / f"step_{step:09d}")[0]


def check_data_order(env: Env, workdir: Path) -> Trial:
    """Every step of every process of the run trained on the reference's batch for that step."""
    ref = env.ref_batches()
    segments = read_trace(workdir)
    if len(segments) < 2:
        return _fail(f"{len(segments)} process(es) traced, expected an interrupted and a resumed one")
    covered = set()
    for seg in segments:
        for step, idx in seg.batches.items():
            if ref.get(step) != idx:
                return _fail(f"step {step} (process starting at {seg.start}) used another batch than the reference")
            covered.add(step)
    if covered != set(ref):
        return _fail(f"steps {sorted(set(ref) - covered)[:5]} never trained")
    return Trial(True, f"{len(segments)} processes, resumed at {[s.start for s in segments[1:]]}")


def check_traced_once(segments: Iterable[Segment]) -> Trial:
    """Every process that exited normally traced ``train_step`` once (0 if it had no step left)."""
    seen = []
    for seg in segments:
        if seg.exit_traces is None:
            continue  # killed
        want = 1 if seg.batches else 0
        seen.append(seg.exit_traces)
        if seg.exit_traces != want:
            return _fail(f"process starting at step {seg.start} traced train_step {seg.exit_traces} times")
    return Trial(True, f"traces per process {seen}", {"processes": len(seen)})


# ------------------------------------------------------------------ trainer trials
def _finish(env: Env, workdir: Path, tries: int = 3) -> Run | Trial:
    """Rerun the same command until it finishes (or ``tries`` runs failed)."""
    run = None
    for _ in range(tries):
        run = env.train(workdir)
        if run.code == 0:
            return run
    assert run is not None
    return _fail(f"rerun exit {run.code}: {run.stderr.strip().splitlines()[-1:]}")


def _same_as_reference(env: Env, workdir: Path) -> Trial:
    if committed(workdir)[-1:] != [TOTAL]:
        return _fail(f"final checkpoints {committed(workdir)}, expected step {TOTAL} last")
    diff = first_difference(step_arrays(workdir, TOTAL), env.ref_arrays(TOTAL))
    if diff:
        return _fail(f"final state not bit-identical: {diff}")
    if stable_metrics(workdir) != env.ref_metrics():
        return _fail("metrics.jsonl differs from the reference")
    summary = json.loads((workdir / "summary.json").read_text())
    ref = json.loads((env.reference / "summary.json").read_text())
    if summary["test_accuracy"] != ref["test_accuracy"]:
        return _fail("final test accuracy differs")
    return Trial(True)


def kill_trial(env: Env, workdir: Path, step: int) -> Trial:
    """kill -9 right after ``step``, rerun until done: final state, metrics bit-identical to the reference."""
    killed = env.train(workdir, fault=f"kill@{step}")
    if killed.code != -signal.SIGKILL:
        return _fail(f"kill@{step}: exit {killed.code}, expected -9: {killed.stderr[-300:]}")
    done = _finish(env, workdir)
    if isinstance(done, Trial):
        return done
    same = _same_as_reference(env, workdir)
    return Trial(same.ok, same.detail or f"kill@{step} -> resumed, bit-identical")


def sigterm_trial(env: Env, workdir: Path, step: int) -> Trial:
    """SIGTERM right after ``step``: exit 0 within 5 s having saved ``step``; the rerun ends bit-exact."""
    termed = env.train(workdir, fault=f"sigterm@{step}")
    sent = [e for s in read_trace(workdir) for e in s.events if e["event"] == "sigterm"]
    if termed.code != 0:
        return _fail(f"sigterm@{step}: exit {termed.code}: {termed.stderr[-300:]}")
    if len(sent) != 1:
        return _fail(f"sigterm@{step}: {len(sent)} SIGTERMs recorded")
    latency = termed.ended - sent[0]["t"]
    figures = {"exit_s": round(latency, 3)}
    if latency > SIGTERM_LIMIT_S:
        return _fail(f"sigterm@{step}: exited {latency:.2f}s after the signal", **figures)
    if f"saved step {step} " not in termed.stderr or committed(workdir)[-1:] != [step]:
        return _fail(f"sigterm@{step}: step {step} not saved (checkpoints {committed(workdir)})", **figures)
    saved = step_arrays(workdir, step)
    if int(saved["step"]) != step:
        return _fail(f"sigterm@{step}: checkpoint holds step {int(saved['step'])}", **figures)
    if step in SAVED and first_difference(saved, env.ref_arrays(step)):
        return _fail(f"sigterm@{step}: saved state differs from the reference's step {step}", **figures)
    done = _finish(env, workdir)
    if isinstance(done, Trial):
        done.figures.update(figures)
        return done
    same = _same_as_reference(env, workdir)
    return Trial(same.ok, same.detail or f"sigterm@{step}: exit 0 after {latency:.2f}s, resumed bit-exact", figures)


def _like(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import jax.numpy as jnp

    return {k: jnp.zeros(v.shape, v.dtype) for k, v in arrays.items()}


def crash_trial(env: Env, workdir: Path, stage: str, kind: str, step: int) -> Trial:
    """A crash (``kind`` "exit": SIGKILL, "exception": an OSError) at ``stage`` of the save of ``step``.

    Then: every committed checkpoint is whole (bit-identical to the reference's at its step), the
    newest is the previous save (or ``step`` itself after a finalize crash), and the next start
    (the trainer's own ``Checkpointer`` set-up and ``restore_latest``) removes the leftovers and
    resumes from it.
    """
    from train.checkpointing import Checkpointer

    fault = f"{'crash' if kind == 'exit' else 'error'}-{stage}@{step}"
    run = env.train(workdir, fault=fault)
    if kind == "exit" and run.code != -signal.SIGKILL:
        return _fail(f"{fault}: exit {run.code}, expected -9: {run.stderr[-300:]}")
    if kind == "exception" and (run.code != 2 or "injected fault" not in run.stderr):
        return _fail(f"{fault}: exit {run.code}, expected 2 with the injected error: {run.stderr[-300:]}")
    before = [s for s in SAVED if s < step]
    want_latest = step if stage == "finalize" else (before[-1] if before else None)
    have = committed(workdir)
    if (have[-1] if have else None) != want_latest:
        return _fail(f"{fault}: committed {have}, expected the newest to be {want_latest}")
    if stage != "finalize" and f".tmp-step_{step:09d}" not in leftovers(workdir):
        return _fail(f"{fault}: no interrupted save left behind ({leftovers(workdir)}): the fault did not hit")
    for s in have:  # nothing half-written is loadable: each committed checkpoint is whole
        try:
            diff = first_difference(step_arrays(workdir, s), env.ref_arrays(s))
        except Exception as e:
            return _fail(f"{fault}: committed step {s} does not load: {type(e).__name__}: {str(e)[:200]}")
        if diff:
            return _fail(f"{fault}: committed step {s} differs from the reference: {diff}")
    ckpt = Checkpointer(workdir / "checkpoints", keep=KEEP)  # what the next start does first
    if leftovers(workdir) or len(committed(workdir)) > KEEP:
        return _fail(f"{fault}: after the next start: leftovers {leftovers(workdir)}, checkpoints {committed(workdir)}")
    if want_latest is None:
        return Trial(True, f"{fault}: no earlier checkpoint; leftovers cleaned")
    restored = ckpt.restore_latest(_like(env.ref_arrays(want_latest)))
    if restored is None or int(restored[1]["step"]) != want_latest:
        return _fail(f"{fault}: next start restores {None if restored is None else restored[1]['step']}")
    diff = first_difference({k: np.asarray(v) for k, v in restored[0].items()}, env.ref_arrays(want_latest))
    if diff:
        return _fail(f"{fault}: restored state differs: {diff}")
    return Trial(True, f"{fault}: step {want_latest} loads, leftovers cleaned")


def nan_skip_trial(env: Env, workdir: Path, step: int, *, finish: bool = True) -> Trial:
    """One NaN batch at ``step`` (2..TOTAL): skipped with the state unchanged; the run finishes.

    With ``--checkpoint-every 1 --keep-checkpoints 2`` and a SIGTERM right after the bad step, the
    checkpoints of steps ``step-1`` and ``step`` must hold identical params, BN statistics,
    optimizer state, EMA and RNG; only the step and skipped counters advance by one. The rerun
    then finishes; afterwards exactly 2 checkpoints and no temporary dir remain (keep-N).
    """
    extra = ("--checkpoint-every", "1", "--keep-checkpoints", "2")
    run = env.train(workdir, *extra, fault=f"nan@{step},sigterm@{step}")
    if run.code != 0 or f"step {step}: non-finite loss or gradients, step skipped" not in run.stderr:
        return _fail(f"nan@{step}: exit {run.code}, no skip warning: {run.stderr[-300:]}")
    if committed(workdir) != [step - 1, step]:
        return _fail(f"nan@{step}: checkpoints {committed(workdir)}, expected {[step - 1, step]}")
    before, after = step_arrays(workdir, step - 1), step_arrays(workdir, step)
    counters = {"step": 1, "skipped": 1}
    for key in before:
        if key in counters:
            if int(after[key]) - int(before[key]) != counters[key]:
                return _fail(f"nan@{step}: {key} went {int(before[key])} -> {int(after[key])}")
        elif first_difference({key: after[key]}, {key: before[key]}):
            return _fail(f"nan@{step}: {key} changed in the skipped step")
    if not finish:
        return Trial(True, f"nan@{step}: skipped, state unchanged")
    done = env.train(workdir, *extra)
    if done.code != 0:
        return _fail(f"nan@{step}: rerun exit {done.code}: {done.stderr[-300:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    if summary["skipped_steps"] != 1 or summary["steps"] != TOTAL:
        return _fail(f"nan@{step}: summary says {summary['skipped_steps']} skipped, {summary['steps']} steps")
    final = step_arrays(workdir, TOTAL)
    if not all(np.isfinite(a).all() for a in final.values() if a.dtype.kind == "f"):
        return _fail(f"nan@{step}: final state not finite")
    if committed(workdir) != [TOTAL - 1, TOTAL] or leftovers(workdir):
        return _fail(f"nan@{step}: after {TOTAL} saves with keep 2: {committed(workdir)} + {leftovers(workdir)}")
    return Trial(True, f"nan@{step}: skipped, state unchanged, finished; keep-2 holds {committed(workdir)}")


def nan_stop_trial(env: Env, workdir: Path, first: int, max_bad: int = 3) -> Trial:
    """NaNs from ``first`` on: exit 1 naming steps first..first+max_bad-1; the last checkpoint predates them."""
    run = env.train(workdir, "--max-bad-steps", str(max_bad), fault=f"nan@{first}-{TOTAL}")
    last_line = (run.stderr.strip().splitlines() or [""])[-1]
    rng = f"steps {first}-{first + max_bad - 1} ({max_bad} in a row)"
    before = [s for s in SAVED if s < first]
    if run.code != 1 or f"non-finite loss at {rng}" not in last_line:
        return _fail(f"nan@{first}-: exit {run.code}, last line {last_line!r}")
    want = f"step {before[-1]} in" if before else "none"
    if f"Last checkpoint: {want}" not in last_line:
        return _fail(f"nan@{first}-: message does not name the last checkpoint {want!r}: {last_line!r}")
    have = committed(workdir)
    if (have[-1:] or [None])[0] != (before[-1] if before else None):
        return _fail(f"nan@{first}-: checkpoints {have}, expected the newest to be {before[-1:]}")
    if before:
        arrays = step_arrays(workdir, have[-1])
        if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
            return _fail(f"nan@{first}-: the last checkpoint is not finite")
        if first_difference(arrays, env.ref_arrays(have[-1])):
            return _fail(f"nan@{first}-: the last checkpoint differs from the reference's (not from before the NaNs)")
    return Trial(True, f"nan@{first}-: stopped at {rng}, last checkpoint {have[-1:] or 'none'}")


# ------------------------------------------------------------------ checkpointer-level trials
def small_state(step: int, seed: int = 0) -> Any:
    """A small real :class:`train.steps.TrainState` (what the trainer saves), at ``step``."""
    import jax
    import jax.numpy as jnp

    from train.steps import TrainState

    rng = np.random.default_rng([seed, step])
    params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4)), jnp.float32)},
              "head": {"bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      batch_stats={"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}, consts={},
                      opt_state={"mu": jax.tree_util.tree_map(jnp.zeros_like, params)}, ema=None,
                      rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))


def checkpointer_error_trial(directory: Path, stage: str, step: int = 4, keep: int = 2) -> Trial:
    """An exception at ``stage`` of save ``step`` (after saves 1..step-1), in-process.

    The exception propagates; every committed checkpoint restores whole; a new ``Checkpointer``
    (the next start) removes the leftovers, prunes to ``keep`` and restores the previous save
    (``step`` itself when the rename had happened).
    """
    from train import faults
    from train.checkpointing import Checkpointer, flatten

    saved = faults._FAULTS
    faults._FAULTS = faults.parse(f"error-{stage}@{step}")
    try:
        ckpt = Checkpointer(directory, keep=keep)
        for s in range(1, step):
            ckpt.save(small_state(s), {})
        try:
            ckpt.save(small_state(step), {})
        except faults.InjectedFault:
            pass
        else:
            return _fail(f"error-{stage}@{step}: the save did not raise")
    finally:
        faults._FAULTS = saved
    want = step if stage == "finalize" else step - 1
    names = sorted(p.name for p in directory.iterdir())
    if stage != "finalize" and f".tmp-step_{step:09d}" not in names:
        return _fail(f"error-{stage}@{step}: no interrupted save in {names}")
    for s in ckpt.steps():  # committed, before the next start
        got = flatten(ckpt.restore(small_state(0), s))
        if first_difference({k: np.asarray(v) for k, v in got.items()},
                            {k: np.asarray(v) for k, v in flatten(small_state(s)).items()}):
            return _fail(f"error-{stage}@{step}: committed step {s} is not whole")
    nxt = Checkpointer(directory, keep=keep)
    names = sorted(p.name for p in directory.iterdir())
    if names != [f"step_{s:09d}" for s in range(want - keep + 1, want + 1)]:
        return _fail(f"error-{stage}@{step}: after the next start: {names}")
    restored = nxt.restore_latest(small_state(0))
    if restored is None or restored[1]["step"] != want:
        return _fail(f"error-{stage}@{step}: the next start restores {restored and restored[1]['step']}")
    return Trial(True, f"error-{stage}@{step}: step {want} restores, leftovers cleaned")


def keep_n_trial(directory: Path, keep: int, saves: int) -> Trial:
    """``saves`` saves with keep ``keep``: exactly the newest ``keep`` checkpoints, no temporary dirs."""
    from train.checkpointing import Checkpointer

    ckpt = Checkpointer(directory, keep=keep)
    for step in range(1, saves + 1):
        ckpt.save(small_state(step), {})
        names = sorted(p.name for p in directory.iterdir())
        want = [f"step_{s:09d}" for s in range(max(1, step - keep + 1), step + 1)]
        if names != want:
            return _fail(f"keep {keep}: after save {step}: {names}")
    return Trial(True, f"keep {keep}: {saves} saves -> {len(want)} checkpoints, no temporary dirs")


def mismatch_trials(arrays: dict[str, np.ndarray], directory: Path) -> list[Trial]:
    """Restore a checkpoint of ``arrays`` into a template with ONE entry changed in shape or dtype.

    Each must raise :class:`train.checkpointing.MismatchError` naming the entry, the stored and the
    expected shape/dtype, before orbax builds any array (orbax would silently cast dtypes).
    """
    import jax.numpy as jnp

    from train.checkpointing import Checkpointer, MismatchError

    ckpt = Checkpointer(directory, keep=1)
    if not ckpt.steps():
        ckpt._ocp.save(ckpt.path(0) / "state", {k: jnp.asarray(v) for k, v in arrays.items()})
        ckpt._ocp.wait_until_finished()
    calls: list[Any] = []
    real_restore = ckpt._ocp.restore
    ckpt._ocp.restore = lambda *a, **k: calls.append(a) or real_restore(*a, **k)  # type: ignore[method-assign]
    out = []
    for key, a in sorted(arrays.items()):
        for change in ("shape", "dtype"):
            like = _like(arrays)
            if change == "shape":
                shape = (*a.shape[:-1], a.shape[-1] + 1) if a.ndim else (1,)
                like[key] = jnp.zeros(shape, a.dtype)
            else:
                other = {np.dtype(np.float32): jnp.bfloat16, np.dtype(np.int32): jnp.int16}.get(a.dtype, jnp.float16)
                like[key] = jnp.zeros(a.shape, other)
            want = like[key]
            try:
                ckpt.restore(like, 0)
            except MismatchError as e:
                msg = str(e)
                stored = f"{tuple(a.shape)} {a.dtype}"
                expected = f"{tuple(want.shape)} {np.dtype(want.dtype)}"
                if calls:
                    out.append(_fail(f"{key} {change}: orbax restore ran before the error"))
                elif repr(key) not in msg or stored not in msg or expected not in msg:
                    out.append(_fail(f"{key} {change}: message lacks the name/stored/expected: {msg}"))
                else:
                    out.append(Trial(True))
            except Exception as e:
                out.append(_fail(f"{key} {change}: {type(e).__name__}: {str(e)[:200]}"))
            else:
                out.append(_fail(f"{key} {change}: restored without error (silent cast/pad)"))
            calls.clear()
    return out


def torch_bridge_mismatch_trials(limit: int | None = None) -> list[Trial]:
    """Each tensor of a DSCNet state dict changed in shape or dtype: refused naming it, stored and expected."""
    from flax import nnx

    import jaxdsc
    import torch_bridge
    from torch_bridge import CheckpointError
    from torch_bridge.convert import load_torch_state_dict

    model = jaxdsc.models.DSCNet(3, width=4, depth=1, rngs=nnx.Rngs(0))
    state = torch_bridge.torch_state_dict(model)
    out = []
    for key, a in sorted(state.items())[:limit]:
        for change in ("shape", "dtype"):
            bad = dict(state)
            bad[key] = (np.zeros((*a.shape, 2), a.dtype) if change == "shape"
                        else a.astype(np.float64 if a.dtype.kind == "f" else np.int32))
            before = torch_bridge.torch_state_dict(model)
            try:
                load_torch_state_dict(model, bad)
            except CheckpointError as e:
                msg = str(e)
                what = (f"shape {tuple(bad[key].shape)}, expected {tuple(a.shape)}" if change == "shape"
                        else f"dtype {bad[key].dtype}, expected {a.dtype}")
                unchanged = first_difference(torch_bridge.torch_state_dict(model), before) is None
                ok = f"'{key}'" in msg and what in msg and unchanged
                out.append(Trial(ok, "" if ok else f"{key} {change}: {msg} (model unchanged: {unchanged})"))
            except Exception as e:
                out.append(_fail(f"{key} {change}: {type(e).__name__}: {e}"))
            else:
                out.append(_fail(f"{key} {change}: accepted"))
    return out


# ------------------------------------------------------------------ files: pickles, flips, fuzz
class Payload:
    """Unpickling this creates ``sentinel`` (``open(sentinel, "w")``): proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.sentinel), "w"))


PAYLOADS = ("pickle", "torch-zip", "torch-legacy")


def write_payload(path: Path, kind: str, sentinel: Path) -> Path:
    """A malicious file: a raw pickle, or ``torch.save``'s zip / legacy container around the payload."""
    obj = {"weight": Payload(sentinel)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        import torch

        torch.save(obj, path, _use_new_zipfile_serialization=kind == "torch-zip")
    return path


def _convert(*argv: Any) -> int:
    import contextlib
    import io

    from torch_bridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    if code == 2 and err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue():
        raise ValueError(err.getvalue().strip())  # the CLI's documented failure: exit 2, one line
    return code


def _train_cli(path: Path, data: Path, workdir: Path, *extra: str) -> int:
    import contextlib
    import io

    from train import cli

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["--preset", "tiny", "--data-dir", str(data), "--workdir", str(workdir), "--no-progress",
                         "--train-limit", "0", "--test-limit", "0", "--batch-size", "16", "--init-from", str(path),
                         *extra])
    if code == 2 and err.getvalue().count("\n") == 1:
        raise ValueError(err.getvalue().strip())
    return code


DSCNET_CONFIG = '{"width": 4, "depth": 1, "num_classes": 10}'


def loaders(tmp: Path, data: Path | None = None) -> dict[str, Callable[[Path], Any]]:
    """Every way a file gets loaded; each raises a ``ValueError`` subclass on a bad file."""
    import torch_bridge
    from train.config import ModelConfig
    from train.model import initial_model

    out: dict[str, Callable[[Path], Any]] = {
        "torch_bridge.load(jax)": lambda p: torch_bridge.load(p, framework="jax"),
        "torch_bridge.load(torch)": lambda p: torch_bridge.load(p, framework="torch"),
        "torch_bridge.read": torch_bridge.read,
        "torch_bridge.read_state_dict": torch_bridge.read_state_dict,
        "--init-from": lambda p: initial_model(ModelConfig(init_from=str(p)), 0),
        "--init-from --init-config": lambda p: initial_model(
            ModelConfig(init_from=str(p), init_config=DSCNET_CONFIG), 0),
        "jaxdsc-convert": lambda p: _convert(p, "--class", "DSCNet", "--config", DSCNET_CONFIG, "-o",
                                             tmp / "converted.safetensors", "--force"),
        "jaxdsc-convert --info": lambda p: _convert("--info", p),
    }
    if data is not None:  # the whole trainer command line (in-process)
        out["jaxdsc-train --init-from"] = lambda p: _train_cli(p, data, tmp / "train-wd", "--init-config",
                                                                 DSCNET_CONFIG)
    return out


def pickle_trial(tmp: Path, loader: str, load: Callable[[Path], Any], suffix: str, payload: str) -> Trial:
    """A payload disguised as ``suffix`` is refused with a ValueError and never executed."""
    sentinel = tmp / f"PWNED-{payload}{suffix}"
    path = write_payload(tmp / f"evil-{payload}{suffix}", payload, sentinel)
    try:
        load(path)
    except ValueError as e:
        if sentinel.exists():
            return _fail(f"{loader} {suffix} {payload}: refused but the payload RAN")
        if path.name not in str(e):
            return _fail(f"{loader} {suffix} {payload}: the error does not name the file: {str(e)[:200]}")
        return Trial(True)
    except Exception as e:
        return _fail(f"{loader} {suffix} {payload}: {type(e).__name__}: {str(e)[:200]}")
    return _fail(f"{loader} {suffix} {payload}: accepted (sentinel created: {sentinel.exists()})")


def payload_works(tmp: Path, payload: str) -> bool:
    """Sanity: the payload does run when unpickled unsafely (so the refusal tests can fail)."""
    sentinel = tmp / f"SANITY-{payload}"
    path = write_payload(tmp / f"sanity-{payload}.pt", payload, sentinel)
    if payload == "pickle":
        pickle.loads(path.read_bytes())
    else:
        import torch

        torch.load(path, weights_only=False)
    return sentinel.exists()


def valid_file(path: Path) -> Path:
    """A valid torch_bridge.save file of a small DSCNet (many tensors)."""
    from flax import nnx

    import jaxdsc
    import torch_bridge

    torch_bridge.save(jaxdsc.models.DSCNet(10, width=4, depth=1, rngs=nnx.Rngs(0)), path)
    return path


def data_region(blob: bytes) -> tuple[int, dict[str, tuple[int, int]]]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, {k: tuple(v["data_offsets"]) for k, v in header.items()}


def bitflip_trial(blob: bytes, path: Path, position: int, bit: int) -> Trial:
    """Flip one bit in the data region: ``read`` and ``load`` name the tensor owning that byte."""
    import torch_bridge
    from torch_bridge import CheckpointError

    start, offsets = data_region(blob)
    pos = start + position % (len(blob) - start)
    owner = next((k for k, (a, b) in offsets.items() if a <= pos - start < b), None)
    flipped = bytearray(blob)
    flipped[pos] ^= 1 << bit
    path.write_bytes(bytes(flipped))
    for reader in (torch_bridge.read, lambda p: torch_bridge.load(p, framework="torch")):
        try:
            reader(path)
        except CheckpointError as e:
            if owner is None or f"tensor '{owner}' fails its SHA-256 check" not in str(e):
                return _fail(f"byte {pos} (tensor {owner}): {e}")
        else:
            return _fail(f"byte {pos} bit {bit} (tensor {owner}): accepted")
    return Trial(True)


def fuzz_one(path: Path, data: bytes, original: dict[str, np.ndarray] | None,
             readers: dict[str, Callable[[Path], Any]]) -> Trial:
    """Every reader either raises a ValueError subclass, or (for a harmless flip) returns the original tensors."""
    from torch_bridge import CheckpointError
    from train.config import ConfigError

    path.write_bytes(data)
    for name, reader in readers.items():
        # documented: CheckpointError; --init-from also ConfigError; the CLI: exit 2 with one line
        allowed: tuple[type[Exception], ...] = (CheckpointError,)
        if name.startswith("--init-from"):
            allowed = (CheckpointError, ConfigError)
        elif name.startswith("jaxdsc-convert"):
            allowed = (ValueError,)
        try:
            got = reader(path)
        except allowed:
            continue
        except ValueError as e:
            return _fail(f"{name}: {type(e).__name__} instead of {allowed[-1].__name__}: {str(e)[:200]}")
        except Exception as e:  # any other type (or a crash of the interpreter, seen by the caller)
            return _fail(f"{name} on {len(data)} bytes: {type(e).__name__}: {str(e)[:200]}")
        if original is None:
            return _fail(f"{name} accepted {len(data)} random bytes")
        if name == "torch_bridge.read" and first_difference(got.tensors, original):
            return _fail(f"{name}: a modified file loaded with different tensors")
    return Trial(True)


def fuzz_readers() -> dict[str, Callable[[Path], Any]]:
    import torch_bridge
    from train.config import ModelConfig
    from train.model import initial_model

    return {"torch_bridge.read": torch_bridge.read,
            "torch_bridge.load(jax)": lambda p: torch_bridge.load(p, framework="jax"),
            "torch_bridge.load(torch)": lambda p: torch_bridge.load(p, framework="torch"),
            "read_state_dict": torch_bridge.read_state_dict,
            "--init-from": lambda p: initial_model(ModelConfig(init_from=str(p)), 0)}


# ------------------------------------------------------------------ the recorded trainer
def _traced_train(argv: list[str]) -> int:
    """``python -m train`` with a recorder (see the module docstring)."""
    trace = os.environ.get(TRACE_VAR)
    from train import cli, faults, loop, steps

    if not trace:
        return cli.main(argv)
    f = open(trace, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def log(**rec: Any) -> None:
        f.write(json.dumps(rec) + "\n")
        f.flush()

    real_train, real_after = loop.Trainer.train, faults.after_step

    def train(self: Any, signals: Any) -> int:
        log(event="start", step=int(steps.to_host(self.state.step)))
        real_batch = self.train_data.batch

        def batch(idx: np.ndarray) -> Any:
            log(event="batch", idx=[int(i) for i in idx])
            return real_batch(idx)

        self.train_data.batch = batch
        return real_train(self, signals)

    def after_step(step: int) -> None:
        for action in ("kill", "sigterm"):
            if faults._hit(action, step):
                log(event=action, step=step, t=time.time())
        real_after(step)

    loop.Trainer.train = train  # type: ignore[method-assign]
    faults.after_step = after_step
    code = cli.main(argv)
    log(event="exit", code=code, traces=steps.TRACES["train_step"])
    return code


if __name__ == "__main__":
    if sys.argv[1:2] != ["train"]:
        sys.exit(f"usage: {sys.argv[0]} train TRAINER-ARGS...")
    sys.exit(_traced_train(sys.argv[2:]))

