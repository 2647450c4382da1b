"""Checkpoint files: one ``.safetensors`` file per module, usable by plain PyTorch.

The file holds the module's PyTorch-layout state dict, so
``twin.load_state_dict(safetensors.torch.load_file(path))`` works, and in its
metadata the class name, the constructor config (JSON, PyTorch names), a
format version and a SHA-256 of every tensor's bytes.

Reading never unpickles and never executes anything from the file: our own
parser reads the safetensors header (JSON) and the raw tensor bytes, checks
every size, offset, key, shape, dtype and hash (the tensors must tile the
data region exactly, as the reference parser requires), and raises
:class:`CheckpointError` naming the file and the problem. Plain PyTorch
``.pt``/``.pth``/``.bin``/``.ckpt`` state dicts are read only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxdsc._io import atomic_write_bytes
from torch_bridge.convert import (
    build_jax,
    build_torch,
    module_config,
    tensor_to_numpy,
    torch_state_dict,
)
from torch_bridge.errors import CheckpointError
from torch_bridge.spec import is_jax, spec_for_name
from torch_bridge.zoo._family import family_for_name, is_zoo_name

FORMAT = "jaxdsc"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024
CONFIG_HASH_KEY = "__config__"  # the sha256 entry that covers the config JSON
TORCH_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: class name, config (PyTorch names) and tensors (PyTorch layout)."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def check_class_name(name: str) -> None:
    """A class name of :mod:`torch_bridge.spec` or a zoo model name the bridge serves (else ValueError)."""
    if is_zoo_name(name):
        family_for_name(name)
    else:
        spec_for_name(name)


# ---------------------------------------------------------------- writing
def save(module: Any, path: str | os.PathLike[str]) -> Path:
    """Write a jaxdsc or torch_bridge module to one ``.safetensors`` file, atomically.

    Returns the path written. Raises ``TypeError`` for modules without a
    conversion rule.
    """

    name, config = module_config(module)
    if is_jax(module):
        state = torch_state_dict(module)
    else:
        state = {k: tensor_to_numpy(v) for k, v in module.state_dict().items()}
    return write_state(path, name, config, state)


def write_state(path: str | os.PathLike[str], name: str, config: Mapping[str, Any],
                state: Mapping[str, np.ndarray], extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write a PyTorch-layout state dict with our metadata (class, config, hashes).

    ``extra_metadata``: more string entries for the header (e.g. the trainer's ``input_mean``);
    they may not replace ours.
    """
    check_class_name(name)
    config_json = json.dumps(dict(config), sort_keys=True)
    hashes = {k: _sha256(v) for k, v in state.items()}
    hashes[CONFIG_HASH_KEY] = hashlib.sha256(config_json.encode()).hexdigest()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "class": name,
        "config": config_json,
        "sha256": json.dumps(hashes, sort_keys=True),
    }
    for key, value in (extra_metadata or {}).items():
        if key in metadata or not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"extra_metadata[{key!r}]: expected a new str key with a str value, got {value!r}")
        metadata[key] = value
    return atomic_write_bytes(path, serialize(state, metadata))


_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}


def serialize(state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of ``state``: deterministic, so equal inputs give equal files.

    (The reference writer emits its metadata in hash-map order, so two saves of
    one module could differ byte-wise.) Tensors are laid out by descending item
    size, then name, which keeps every tensor aligned to its item size.
    """
    arrays = {k: np.asarray(v).copy(order="C") for k, v in state.items()}  # keeps 0-d shapes
    for k, a in arrays.items():
        if a.dtype not in _DTYPE_NAMES:
            raise TypeError(f"state[{k!r}] has dtype {a.dtype}, expected one of {sorted(_DTYPES)}")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset, chunks = 0, []
    for k in sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k)):
        a = arrays[k]
        header[k] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                     "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        chunks.append(a.tobytes())
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])


# ---------------------------------------------------------------- reading
def _fail(path: Path | str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors file without third-party code: (tensors, metadata), all validated."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot read file: {e.strerror or e}") from e
    if len(blob) < 8:
        raise _fail(path, f"not a safetensors file ({len(blob)} bytes, expected an 8-byte header length first)")
    n = int.from_bytes(blob[:8], "little")
    if n < 2 or n > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise _fail(path, f"not a safetensors file (header length {n} does not fit a {len(blob)}-byte file)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "metadata must map strings to strings")
    data = memoryview(blob)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for key, info in header.items():
        tensors[key] = _tensor(path, key, info, data)
    _check_tiling(path, header, len(data))
    return tensors, metadata


def _check_tiling(path: Path, header: dict[str, Any], size: int) -> None:
    """The tensors' byte ranges must tile the data region: no gap, no overlap, no trailing bytes.

    The same rule as the reference parser (the safetensors crate's ``Metadata::validate`` and its
    "file not fully covered" check): ranges sorted by (start, end) begin where the previous one
    ended, from 0, and the last ends at the end of the file. So no two tensors share bytes and no
    bytes hide in the file unaccounted for.
    """
    end = 0
    for (start, stop), key in sorted((tuple(info["data_offsets"]), key) for key, info in header.items()):
        if start != end:
            what = "overlaps the previous tensor" if start < end else f"leaves a gap of {start - end} bytes"
            raise _fail(path, f"tensor {key!r} at data offsets [{start}, {stop}] {what} (expected it to start at "
                              f"{end}; the tensors must cover the data region contiguously)")
        end = stop
    if end != size:
        raise _fail(path, f"the tensors cover {end} of the {size} bytes of the data region ({size - end} bytes "
                          "are not part of any tensor)")


def _tensor(path: Path, key: str, info: Any, data: memoryview) -> np.ndarray:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {key!r} has a malformed header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise _fail(path, f"tensor {key!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _fail(path, f"tensor {key!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= len(data)
    ):
        raise _fail(path, f"tensor {key!r} has data offsets {offsets!r} outside the {len(data)}-byte data region")
    np_dtype = _DTYPES[dtype]
    if (offsets[1] - offsets[0]) != math.prod(shape) * np_dtype.itemsize:
        raise _fail(path, f"tensor {key!r} has {offsets[1] - offsets[0]} bytes, expected "
                          f"{math.prod(shape) * np_dtype.itemsize} for shape {shape} {dtype}")
    raw = data[offsets[0] : offsets[1]]
    return np.frombuffer(raw, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(shape)


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save` (format, class, config, hashes, shapes)."""
    from torch_bridge.convert import abstract_torch, tensor_to_numpy_dtype, validate_state

    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise _fail(path, "no jaxdsc metadata (a plain state dict?): convert it with jaxdsc-convert --class ... --config ...")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise _fail(path, f"format_version {version!r} is not supported (this jaxdsc reads <= {FORMAT_VERSION})")
    name = metadata.get("class", "")
    try:
        check_class_name(name)
        config = json.loads(metadata.get("config", ""))
        hashes = json.loads(metadata.get("sha256", ""))
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"bad metadata: {e}") from e
    if not isinstance(config, dict) or not isinstance(hashes, dict):
        raise _fail(path, "bad metadata: config and sha256 must be JSON objects")
    config_hash = hashes.pop(CONFIG_HASH_KEY, None)
    if config_hash != hashlib.sha256(metadata["config"].encode()).hexdigest():
        raise _fail(path, "the config metadata fails its SHA-256 check (corrupted or modified)")
    for key, a in tensors.items():
        if hashes.get(key) != _sha256(a):
            raise _fail(path, f"tensor {key!r} fails its SHA-256 check (corrupted or modified data)")
    if set(hashes) != set(tensors):
        raise _fail(path, f"hash list and tensors differ: {sorted(set(hashes) ^ set(tensors))[:5]}")
    try:
        twin = abstract_torch(name, config)  # shapes of what this config builds, no allocation
    except CheckpointError as e:  # name the file, as every other error here does
        raise _fail(path, str(e)) from None
    expected = {k: (tuple(t.shape), tensor_to_numpy_dtype(t.dtype)) for k, t in twin.state_dict().items()}
    floats = {a.dtype for a in tensors.values() if a.dtype.kind == "f" or a.dtype == _DTYPES["BF16"]}
    if len(floats) == 1:  # a model saved in bf16/f64 is expected in that dtype throughout
        (fdtype,) = floats
        expected = {k: (s, fdtype if d.kind == "f" else d) for k, (s, d) in expected.items()}
    try:
        validate_state({k: (a.shape, a.dtype) for k, a in tensors.items()}, expected, source=str(path))
    except CheckpointError as e:
        raise CheckpointError(str(e)) from None
    return Checkpoint(name=name, config=config, tensors=tensors, metadata=metadata)


def load(path: str | os.PathLike[str], framework: str = "jax", **options: Any) -> Any:
    """Rebuild the module saved in ``path`` in ``framework`` ("jax" or "torch").

    ``options`` (JAX only) go to the constructor when it takes them, e.g. ``impl``.
    The module is returned in eval mode (inference); call ``.train()`` to fine-tune.
    """
    if framework not in ("jax", "torch"):
        raise ValueError(f"framework must be 'jax' or 'torch', got {framework!r}")
    ckpt = read(path)
    try:
        if framework == "torch":
            module = build_torch(ckpt.name, ckpt.config, ckpt.tensors, source=str(path))
        else:
            module = build_jax(ckpt.name, ckpt.config, ckpt.tensors, source=str(path), **options)
    except CheckpointError as e:  # e.g. a config only the JAX constructor refuses: name the file
        if str(path) in str(e):
            raise
        raise _fail(path, str(e)) from None
    module.eval()
    return module


# Prefixes that PyTorch wrappers put before every key of the model they wrap:
# DataParallel / DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``state`` without the wrapper prefixes that every key carries, and what was removed.

    A state dict saved from ``DistributedDataParallel(model)`` or
    ``torch.compile(model)`` names ``conv.weight`` as ``module.conv.weight`` or
    ``_orig_mod.conv.weight``. A prefix is removed only when every key has it
    (repeatedly, e.g. ``module._orig_mod.``); otherwise ``state`` is unchanged.
    """
    out, removed = dict(state), ""
    while out:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None:
            break
        out = {k[len(prefix):]: v for k, v in out.items()}
        removed += prefix
    return out, removed


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A plain PyTorch state dict from ``.safetensors`` or (safely) ``.pt``/``.pth``/``.bin``/``.ckpt``.

    Pickle-based files are opened with ``torch.load(weights_only=True)``,
    which refuses arbitrary objects; anything else is refused.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    if path.suffix not in TORCH_PICKLE_SUFFIXES:
        raise _fail(path, f"unknown file type {path.suffix!r}; expected .safetensors or one of {TORCH_PICKLE_SUFFIXES}")
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before refusing them
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zip errors...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(path, f"refused: not a weights-only PyTorch state dict ({first[:200]})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise _fail(path, "expected a state dict mapping names to tensors")
    return {k: tensor_to_numpy(v) for k, v in obj.items()}
