"""Checkpoints: orbax-serialised train state behind an atomic directory commit.

Layout of ``workdir/checkpoints/``::

    step_000001200/state/      orbax StandardCheckpointer (flat dict "params.blocks.0.depthwise.kernel": array)
    step_000001200/meta.json   step, epoch, train_seconds, config hash
    .tmp-step_000001400/       a save in progress (or interrupted: removed at the next start)
    .del-step_000000800/       a checkpoint being pruned (likewise)

A save writes everything into a ``.tmp-*`` dir, fsyncs it and renames it to
``step_*`` in one ``os.rename``: a crash at any point leaves either the
complete new checkpoint or none, and only ``step_*`` dirs are ever read.
Pruning renames before deleting, so a half-deleted checkpoint is never
mistaken for a whole one. The state saved is the complete pytree (params,
BN statistics, optimizer, EMA, step, RNG), restored into the exact dtypes
and shardings of a freshly initialised state, so resuming continues
bit-exactly. Non-finite states are refused. Fault hooks
(:mod:`train.faults`) sit between the stages ``write`` / ``rename`` /
``finalize``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train import faults
from train.optim import path_str
from train.steps import all_finite, to_host

PREFIX, TMP, DEL = "step_", ".tmp-", ".del-"


class RestoreError(ValueError):
    """No usable checkpoint although some exist (reported as one line)."""


class MismatchError(RestoreError):
    """A checkpoint whose arrays do not fit the model (names the entry, stored and expected shape/dtype)."""


def _quiet_orbax() -> None:
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def flatten(tree: Any) -> dict[str, Any]:
    """``{"params.blocks.0.depthwise.kernel": leaf, ...}`` for any pytree (keys must be unique)."""
    flat: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path_str(path)
        if key in flat:
            raise ValueError(f"two state leaves share the checkpoint key {key!r}")
        flat[key] = leaf
    return flat


def unflatten(like: Any, flat: dict[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in paths])


def first_mismatch(stored: dict[str, Any], expected: dict[str, Any], *, extra_ok: bool = False) -> str | None:
    """The first way ``stored`` arrays (anything with shape/dtype) differ from ``expected``; None if they fit.

    Missing or (unless ``extra_ok``) unexpected keys, else the first entry whose shape or dtype differs,
    named with both: restoring tools would cast or reshape silently, so callers check this first.
    """
    missing = sorted(set(expected) - set(stored))
    extra = [] if extra_ok else sorted(set(stored) - set(expected))
    if missing or extra:
        return f"missing {missing[:5]}, unexpected {extra[:5]}"
    for key, want in expected.items():
        got = stored[key]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            return (f"{key!r} is stored as {tuple(got.shape)} {np.dtype(got.dtype)}, "
                    f"expected {tuple(want.shape)} {np.dtype(want.dtype)}")
    return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Periodic, atomic, keep-last-N checkpoints of a train state in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self.dir = Path(directory)
        self.keep = keep
        self.primary = jax.process_index() == 0
        self._ocp = ocp.StandardCheckpointer()
        if self.primary:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.clean()
        _barrier("jaxdsc-ckpt-init")

    # ------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and p.is_dir():
                out.append(int(p.name[len(PREFIX):]))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.dir / f"{PREFIX}{step:09d}"

    def clean(self) -> None:
        """Remove leftovers of interrupted saves / prunes and keep only the newest ``keep``."""
        for p in self.dir.iterdir():
            if p.name.startswith((TMP, DEL)):
                shutil.rmtree(p, ignore_errors=True)
        self.prune()

    def prune(self) -> None:
        for step in self.steps()[: -self.keep]:
            doomed = self.dir / f"{DEL}{PREFIX}{step:09d}"
            os.rename(self.path(step), doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------ saving
    def save(self, state: Any, meta: dict[str, Any]) -> Path | None:
        """Commit ``state`` as the checkpoint of its step; None when refused (non-finite) or present."""
        step = int(to_host(state.step))
        final = self.path(step)
        if final.exists():
            return None
        if not bool(to_host(all_finite((state.params, state.batch_stats, state.opt_state, state.ema)))):
            print(f"warning: not saving step {step}: the state is not finite", file=sys.stderr)
            return None
        tmp = self.dir / f"{TMP}{PREFIX}{step:09d}"  # same name on every host
        if self.primary:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier("jaxdsc-ckpt-mkdir")
        self._ocp.save(tmp / "state", flatten(state))
        self._ocp.wait_until_finished()
        faults.during_save("write", step)
        if self.primary:
            with open(tmp / "meta.json", "w") as f:
                json.dump({**meta, "step": step}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            faults.during_save("rename", step)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            faults.during_save("finalize", step)
            self.prune()
        _barrier("jaxdsc-ckpt-commit")
        return final

    # ------------------------------------------------------------ restoring
    def meta(self, step: int) -> dict[str, Any]:
        with open(self.path(step) / "meta.json") as f:
            meta: dict[str, Any] = json.load(f)
        return meta

    def restore(self, like: Any, step: int) -> Any:
        """The state of checkpoint ``step`` with the structure, dtypes and shardings of ``like``.

        The stored keys, shapes and dtypes must equal those of ``like`` exactly (orbax would
        silently cast dtypes): :class:`MismatchError` otherwise, before any array is read.
        """
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flatten(like).items()}
        self._check_fits(step, target)
        return unflatten(like, self._ocp.restore(self.path(step) / "state", target))

    def _check_fits(self, step: int, target: dict[str, jax.ShapeDtypeStruct]) -> None:
        stored = self._ocp.metadata(self.path(step) / "state").item_metadata.tree
        problem = first_mismatch(stored, target)
        if problem:
            raise MismatchError(f"{self.path(step)} does not fit this model: {problem} (no silent casts)")

    def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the newest checkpoint that restores; None when there is none.

        Raises :class:`RestoreError` when checkpoints exist but none restores (never
        silently restarts over them).
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return self.restore(like, step), self.meta(step)
            except MismatchError:
                raise  # not damage: an older checkpoint of the same run would not fit either
            except Exception as e:  # a damaged checkpoint: say so and fall back to the previous one
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"warning: checkpoint {self.path(step)} does not restore ({first}); trying an older one",
                      file=sys.stderr)
        if steps:
            raise RestoreError(f"{self.dir}: none of the checkpoints {steps} restores; move them away or use a "
                                  "new --workdir")
        return None


def read_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], Path]:
    """All arrays of the newest checkpoint under ``path`` (a workdir, its checkpoints/ or one step dir).

    Returns ``(flat arrays on the host, checkpoint dir)``; raises ``FileNotFoundError`` when there is none.
    """
    import orbax.checkpoint as ocp

    _quiet_orbax()
    path = Path(path)
    candidates = [path] if path.name.startswith(PREFIX) else []
    for root in (path / "checkpoints", path):
        if root.is_dir():
            candidates += sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()),
                                 reverse=True)
    for ckpt in candidates:
        if (ckpt / "state").is_dir():
            ckptr = ocp.StandardCheckpointer()
            tree = ckptr.metadata(ckpt / "state").item_metadata.tree
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev) for k, m in tree.items()}
            return {k: np.asarray(v) for k, v in ckptr.restore(ckpt / "state", target).items()}, ckpt
    raise FileNotFoundError(f"{path}: no jaxdsc-train checkpoint (step_*/state) here")
