"""Files of a run's workdir: the settings check, atomic text, ``metrics.jsonl``, small summaries.

Shared by the image loop (:mod:`train.loop`) and the sequence loop (:mod:`train.seq_loop`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from jaxdsc._io import atomic_write_text
from train.config import Config, ConfigError, flat_fields


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def check_config(workdir: Path, cfg: Config) -> None:
    """Refuse to resume a workdir whose checkpoints come from different (non-``resume``) settings."""
    path = workdir / "config.json"
    ckpts = workdir / "checkpoints"
    has_checkpoints = ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())
    if has_checkpoints and path.is_file():
        old = json.loads(path.read_text())
        diffs = []
        for name, (section, f) in flat_fields().items():
            before, now = old.get(section, {}).get(name), getattr(getattr(cfg, section), name)
            if name not in old.get(section, {}) and now == _default(f):
                continue  # a flag newer than the run, left at its default: same settings
            if not f.metadata["resume"] and json.dumps(before) != json.dumps(now):
                diffs.append(f"--{name.replace('_', '-')} {before} -> {now}")
        if diffs:
            raise ConfigError(f"{workdir} holds a run with different settings ({'; '.join(diffs[:4])}); "
                              "rerun with the same flags to resume or use a new --workdir")


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    os.chmod(path, 0o644)  # results are for everyone to read (mkstemp creates 0600)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop records past ``step`` (logged after the checkpoint we resume from); return the rest."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", math.inf) <= step:
                records.append(rec)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB; macOS: bytes)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def time_to(records: list[dict[str, Any]], target: float) -> float | None:
    hit = [r["train_seconds"] for r in records if r["test_accuracy"] >= target]
    return round(hit[0], 2) if hit else None
