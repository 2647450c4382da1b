"""Fault injection for reliability tests, read from ONE environment variable.

``JAXDSC_TRAIN_FAULT`` holds comma-separated ``ACTION@STEPS`` items; ``STEPS``
is ``N`` or ``N-M`` (inclusive), or omitted for "every step". Step ``k`` is
the update that takes the step counter from ``k-1`` to ``k``. Actions:

========================  =====================================================
``kill@N``                SIGKILL this process right after step N (like kill -9)
``sigterm@N``             send SIGTERM to this process right after step N
``nan@N-M``               poison the batches of steps N..M with NaN (inside the jitted step)
``crash-write@N``         SIGKILL while saving the checkpoint of step N, after the
                          arrays are written into the temporary dir
``crash-rename@N``        ... after the temporary dir is complete, before the rename
``crash-finalize@N``      ... after the rename, before old checkpoints are pruned
``error-write@N``         raise :class:`InjectedFault` (an ``OSError``, like a full
``error-rename@N``        disk) at the same three points of the save of step N,
``error-finalize@N``      instead of killing the process
========================  =====================================================

Example: ``JAXDSC_TRAIN_FAULT=nan@5,kill@9 python -m train ...``. Nothing
else in the trainer reads the environment for faults; without the variable
every hook is a no-op.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV_VAR = "JAXDSC_TRAIN_FAULT"
ACTIONS = ("kill", "sigterm", "nan", "crash-write", "crash-rename", "crash-finalize", "error-write", "error-rename",
           "error-finalize")


class InjectedFault(OSError):
    """The exception raised by the ``error-*`` actions (an I/O error in the middle of a save)."""


@dataclass(frozen=True)
class Fault:
    action: str
    first: int
    last: int

    def covers(self, step: int) -> bool:
        return self.first <= step <= self.last


def parse(spec: str) -> tuple[Fault, ...]:
    """Parse a ``JAXDSC_TRAIN_FAULT`` value; raise ``ValueError`` with one line when malformed."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, steps = item.partition("@")
        if action not in ACTIONS:
            raise ValueError(f"{ENV_VAR}: unknown action {action!r} in {item!r}; expected one of {ACTIONS}")
        try:
            if not steps:
                first, last = 0, 2**62
            else:
                lo, _, hi = steps.partition("-")
                first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: bad step range in {item!r} (use N or N-M)") from None
        faults.append(Fault(action, first, last))
    return tuple(faults)


_FAULTS: tuple[Fault, ...] | None = None


def active() -> tuple[Fault, ...]:
    """The faults from the environment (parsed once per process)."""
    global _FAULTS
    if _FAULTS is None:
        _FAULTS = parse(os.environ.get(ENV_VAR, ""))
    return _FAULTS


def _hit(action: str, step: int) -> bool:
    return any(f.action == action and f.covers(step) for f in active())


def poison(step: int) -> float:
    """What the train step adds to the images of step ``step``: 0.0, or NaN when injected."""
    return float("nan") if _hit("nan", step) else 0.0


def after_step(step: int) -> None:
    """Hook run after step ``step`` completed: may SIGKILL or SIGTERM this process."""
    if _hit("kill", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit("sigterm", step):
        os.kill(os.getpid(), signal.SIGTERM)


def during_save(stage: str, step: int) -> None:
    """Hook run at save stage ``write`` / ``rename`` / ``finalize`` of the checkpoint of ``step``."""
    if _hit(f"crash-{stage}", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit(f"error-{stage}", step):
        raise InjectedFault(f"injected fault: error while saving step {step} (stage {stage})")
