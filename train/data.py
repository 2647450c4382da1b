"""CIFAR-10 from its official distributions: readers, validation and download.

Accepted locations (``--data-dir``):

* a directory holding ``cifar-10-batches-bin/`` (binary records) or
  ``cifar-10-batches-py/`` (pickled batches),
* either batch directory itself,
* the official ``cifar-10-binary.tar.gz`` / ``cifar-10-python.tar.gz`` (read in
  place, nothing extracted), or a directory holding one.

The pickle layout is unpickled with a restricted unpickler (only the NumPy
array constructors the official files use), but pickle is still a code format:
read it only from a trusted source. Every file is checked (record size,
labels in 0..9, image counts) and any problem is one :class:`DataError` line
naming the file. With no ``--data-dir`` the cache dir is used and, when it
holds no data set, the official archive is downloaded there (md5-checked,
with a progress bar) and unpacked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
SHAPE = (32, 32, 3)
RECORD = 1 + 32 * 32 * 3  # label byte + R, G, B planes
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
BIN_DIR, PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
ARCHIVES = ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz")


class DataError(ValueError):
    """Missing, incomplete or malformed data (reported as one line)."""


def _brief(e: BaseException) -> str:
    """An exception's message as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


@dataclass(frozen=True)
class Cifar10:
    """The data set as uint8 NHWC images and int32 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def limit(self, train: int = 0, test: int = 0) -> Cifar10:
        """The first ``train`` / ``test`` images (0: all)."""
        tr, te = train or len(self.train_labels), test or len(self.test_labels)
        return Cifar10(self.train_images[:tr], self.train_labels[:tr], self.test_images[:te],
                       self.test_labels[:te], self.source)


# ---------------------------------------------------------------- parsing one file
def _check_labels(where: str, labels: np.ndarray) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = int(labels[(labels < 0) | (labels >= NUM_CLASSES)][0])
        raise DataError(f"{where}: label {bad} outside 0..{NUM_CLASSES - 1} (not CIFAR-10?)")
    return labels.astype(np.int32)


def _planes_to_nhwc(planes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(planes.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def parse_binary(where: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from one binary batch (``n`` records of 3073 bytes)."""
    if not blob or len(blob) % RECORD:
        raise DataError(f"{where}: {len(blob)} bytes is not a whole number of {RECORD}-byte records "
                        "(truncated or not a CIFAR-10 binary batch)")
    rec = np.frombuffer(blob, np.uint8).reshape(-1, RECORD)
    return _planes_to_nhwc(rec[:, 1:]), _check_labels(where, rec[:, 0])


class _Unpickler(pickle.Unpickler):
    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def parse_pickle(where: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from one pickled batch (trusted data only, see the module doc)."""
    try:
        obj = _Unpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError... from a damaged file
        raise DataError(f"{where}: not a CIFAR-10 pickle batch ({type(e).__name__}: {_brief(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR-10 pickle batch (a {type(obj).__name__}, expected a dict)")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise DataError(f"{where}: not a CIFAR-10 pickle batch (no 'data'/'labels' entries)")
    data, labels = np.asarray(obj["data"]), np.asarray(obj["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != RECORD - 1 or not len(data):
        raise DataError(f"{where}: 'data' is {data.dtype}{list(data.shape)}, expected uint8[n, {RECORD - 1}]")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: {labels.size} labels for {len(data)} images")
    return _planes_to_nhwc(data), _check_labels(where, labels)


# ---------------------------------------------------------------- layouts
def _assemble(where: str, files: Mapping[str, bytes], parse: Callable[[str, bytes], tuple[np.ndarray, np.ndarray]],
              suffix: str) -> Cifar10:
    missing = [n + suffix for n in (*TRAIN_FILES, TEST_FILE) if n + suffix not in files]
    if missing:
        raise DataError(f"{where}: incomplete CIFAR-10, missing {', '.join(missing)}")
    parts = [parse(f"{where}/{n}{suffix}", files[n + suffix]) for n in TRAIN_FILES]
    tx, ty = parse(f"{where}/{TEST_FILE}{suffix}", files[TEST_FILE + suffix])
    return Cifar10(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), tx, ty, where)


def _read_dir(path: Path, kind: str) -> Cifar10:
    suffix = ".bin" if kind == "bin" else ""
    files = {}
    for n in (*TRAIN_FILES, TEST_FILE):
        f = path / (n + suffix)
        if f.is_file():
            try:
                files[f.name] = f.read_bytes()
            except OSError as e:
                raise DataError(f"{f}: cannot read ({e.strerror or _brief(e)})") from None
    return _assemble(str(path), files, parse_binary if kind == "bin" else parse_pickle, suffix)


def read_archive(path: Path) -> Cifar10:
    """Read the official ``.tar.gz`` (binary or python version) without extracting it."""
    files: dict[str, bytes] = {}
    kind = None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parent, _, name = member.name.rpartition("/")
                layout = {BIN_DIR: "bin", PY_DIR: "py"}.get(parent.rpartition("/")[2])
                if member.isfile() and layout and name.removesuffix(".bin") in (*TRAIN_FILES, TEST_FILE):
                    kind = kind or layout
                    fobj = tar.extractfile(member)
                    if layout == kind and fobj is not None:
                        files[name] = fobj.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 .tar.gz ({_brief(e)})") from None
    if kind is None:
        raise DataError(f"{path}: archive holds no {BIN_DIR}/ or {PY_DIR}/ batches")
    return _assemble(str(path), files, parse_binary if kind == "bin" else parse_pickle,
                     ".bin" if kind == "bin" else "")


def find(path: Path) -> tuple[str, Path] | None:
    """``(kind, path)`` of the data set at ``path`` (kind: bin, py or tar), or None."""
    if path.is_file():
        return ("tar", path) if path.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    for sub, kind in ((BIN_DIR, "bin"), (PY_DIR, "py")):
        if (path / sub).is_dir():
            return kind, path / sub
    if (path / "data_batch_1.bin").is_file() or (path / "test_batch.bin").is_file():
        return "bin", path
    if (path / "data_batch_1").is_file() or (path / "test_batch").is_file():
        return "py", path
    for name in ARCHIVES:
        if (path / name).is_file():
            return "tar", path / name
    return None


def load(path: str | Path) -> Cifar10:
    """Read CIFAR-10 from any accepted location (see the module doc)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (pass --data-dir pointing at CIFAR-10)")
    found = find(path)
    if found is None:
        raise DataError(f"{path}: no CIFAR-10 here (expected {BIN_DIR}/, {PY_DIR}/, the batch files "
                        "or the official .tar.gz)")
    kind, where = found
    return read_archive(where) if kind == "tar" else _read_dir(where, kind)


# ---------------------------------------------------------------- download
def download(url: str, dest: Path, md5: str, *, progress: bool = True) -> Path:
    """Fetch ``url`` into ``dest`` (a directory), check its md5, return the archive path.

    Raises :class:`DataError` with one line when offline or the checksum fails;
    nothing partial is left behind.
    """
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    name = url.rstrip("/").rpartition("/")[2] or "cifar-10.tar.gz"
    target, tmp = dest / name, dest / f".{name}.part"
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress,
                      leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = _brief(getattr(e, "reason", None) or e)
        raise DataError(f"cannot download CIFAR-10 from {url} ({reason}); offline? pass --data-dir DIR "
                        "with a copy (cifar-10-batches-bin/, cifar-10-batches-py/ or the .tar.gz)") from None
    if md5 and digest.hexdigest() != md5.lower():
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5} (corrupt or wrong "
                        "file; removed it); retry or pass --data-dir")
    tmp.replace(target)
    return target


def unpack(archive: Path, dest: Path) -> Path:
    """Extract only the official batch files of ``archive`` into ``dest`` (via a temp dir + rename)."""
    read_archive(archive)  # validates everything before anything is written
    kind = "bin" if any(m.endswith(".bin") for m in _member_names(archive)) else "py"
    final = dest / (BIN_DIR if kind == "bin" else PY_DIR)
    tmp = dest / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name.rpartition("/")[2]
            if member.isfile() and name.removesuffix(".bin") in (*TRAIN_FILES, TEST_FILE, "batches.meta"):
                fobj = tar.extractfile(member)
                if fobj is not None:
                    (tmp / name).write_bytes(fobj.read())
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    return final


def _member_names(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        return tar.getnames()


def load_or_download(data_dir: str, cache_dir: Path, url: str, md5: str, *, progress: bool = True) -> Cifar10:
    """``load(data_dir)``; with an empty ``data_dir`` the cache dir, downloaded into when empty."""
    if data_dir:
        return load(data_dir)
    if cache_dir.exists() and find(cache_dir) is not None:
        return load(cache_dir)
    archive = download(url, cache_dir, md5, progress=progress)
    unpack(archive, cache_dir)
    with contextlib.suppress(OSError):
        archive.unlink()
    return load(cache_dir)
