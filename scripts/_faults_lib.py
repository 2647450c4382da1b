"""Trainer trials of the reliability properties, shared by ``scripts/faults.py`` and ``tests/test_faults.py``.

Every trial returns a :class:`Trial` (``ok`` plus a one-line ``detail``), so the
CI tests (small counts) and the script (full counts) check exactly the same
thing. Training trials run the trainer in a subprocess, as a user would:

    python scripts/_faults_lib.py train ARGS...   ==  python -m train ARGS...

plus a recorder (enabled by ``$JAXDSC_FAULTS_TRACE``) that appends to a JSON
lines file the index batch of every training step, the moment an injected
kill/SIGTERM is sent, and the number of ``train_step`` traces at exit. Faults
are injected with ``$JAXDSC_TRAIN_FAULT`` (:mod:`train.faults`).

Checkpointer-level and file trials are in ``_faults_files.py``.

All trials of one :class:`Env` share the tiny data set, a persistent XLA
compilation cache (reruns skip compiling) and ONE uninterrupted reference run
(2 epochs x 8 steps, AdamW, EMA, checkpoints every 3 steps, all kept) that the
interrupted runs must reproduce bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
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

