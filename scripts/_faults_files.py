"""Checkpointer-level and file trials of issue 4, shared by ``scripts/faults.py`` and the CI tests.

Checkpointer trials call :class:`train.checkpointing.Checkpointer` in-process (I/O errors at each
save stage, keep-N, mismatched arrays); file trials hand malicious pickles, bit-flipped and fuzzed
files to every loader (:func:`loaders`). Trainer trials (subprocesses) live in :mod:`_faults_lib`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _faults_lib import Trial, _fail, _like, first_difference

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")  # what a checkpoint is called in the wild


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


