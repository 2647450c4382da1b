"""Fault injection for reliability tests, read from ONE environment variable.

``JAXDSC_TRAIN_FAULT`` holds comma-separated ``ACTION@STEPS`` items; ``STEPS``
is ``N`` or ``N-M`` (inclusive), or omitted for "every step". Step ``k`` is
the update that takes the step counter from ``k-1`` to ``k``. Actions:

========================  =====================================================
``kill@N``                SIGKILL this process right after step N (like kill -9)
``sigterm@N``             send SIGTERM to this process right after step N
``nan@N-M``               make steps N..M non-finite (see :func:`wrap_train_step`)
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
every hook is a no-op, and the production step (:mod:`train.steps`) knows
nothing of faults: the ``nan`` action wraps it only when it is requested.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    """The poison of step ``step``: 0.0, or NaN when injected."""
    return float("nan") if _hit("nan", step) else 0.0


def injects_nan() -> bool:
    """Whether any ``nan`` fault is requested (then the loop wraps its step and feeds ``poison``)."""
    return any(f.action == "nan" for f in active())


def wrap_train_step(train_step: Callable[[Any, Any], tuple[Any, Any]]) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``train_step`` itself, or with ``nan`` faults a wrapper (traced into the same jitted program).

    The wrapper takes one more batch entry, ``poison``: a ``(B,)`` float32 vector of zeros, or of
    NaNs for a poisoned step. It adds the poison to the parameters the step starts from, so the
    loss and gradients are NaN and the step must skip itself; the parameters of the input state
    are then put back, as an unpoisoned skip would have kept them. With zeros it is exact
    (``x + 0.0 == x``): runs with a ``nan`` fault match clean runs bit for bit on the other steps.
    """
    if not injects_nan():
        return train_step
    import jax
    import jax.numpy as jnp

    def poisoned(state: Any, batch: Any) -> tuple[Any, Any]:
        batch = dict(batch)
        p = jnp.sum(batch.pop("poison"))  # NaN when any entry is
        add = lambda x: x + p.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x  # noqa: E731
        new, metrics = train_step(state.replace(params=jax.tree_util.tree_map(add, state.params)), batch)
        back = lambda n, o: jnp.where(jnp.isnan(p), o, n)  # noqa: E731
        return new.replace(params=jax.tree_util.tree_map(back, new.params, state.params)), metrics

    return poisoned


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
