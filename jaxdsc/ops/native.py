"""Loader of the native C++ kernel library (``jaxdsc/_dwconv*.so``) for the CPU platform.

The library is built by ``pip install`` (``csrc/``) and holds several kernel
families: the depthwise conv (:mod:`jaxdsc.ops.native_depthwise`), the
pointwise GEMM (:mod:`jaxdsc.ops.native_pointwise`), train-mode batch norm
(:mod:`jaxdsc.ops.batchnorm`) and the fused separable forward
(:mod:`jaxdsc.ops.separable`). This module knows none of them: each family
registers its XLA FFI targets and its self-check here with
:func:`register_family`, and asks :func:`available` before it traces a call.

Nothing happens at import. On the first :func:`available` the library is
loaded with ``ctypes``; on the first question about a family its targets are
registered for the CPU platform and its self-check runs once (a few tiny
jitted calls on the CPU device, evaluated even when first asked inside a
trace). A family whose targets are missing (an older build) or whose check
fails is withheld, with a ``RuntimeWarning`` for a failed check: ops then use
their pure-JAX paths. A family may also name what the CPU must have (the
bfloat16-product GEMMs: AMX or AVX512-BF16); on a CPU without it the family
is simply not for this machine: no check, no warning, and ``available()``
with no family asks only about the families this CPU can run. ``JAXDSC_DISABLE_NATIVE=1`` withholds the whole library;
``JAXDSC_NATIVE_LIB=/path/lib.so`` loads another build.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxdsc.ops import _build

__all__ = [
    "available",
    "isa",
    "library",
    "library_present",
    "register_family",
    "set_huge_pages",
    "set_isa",
    "unavailable_reason",
]


@dataclass(frozen=True)
class _Family:
    targets: tuple[str, ...]
    self_check: Callable[[], str]  # "" when the kernels agree with their reference
    requires: tuple[str, ...]
    supported: Callable[[], str] | None  # "" when this CPU can run the family, else what it lacks


_FAMILIES: dict[str, _Family] = {}
_STATUS: dict[str, str] = {}  # family -> "" (available) or why not; filled lazily
_UNSUPPORTED: dict[str, str] = {}  # family -> what this CPU lacks for it ("" when nothing)
_LOCK = threading.RLock()
_LIB: ctypes.CDLL | None = None
_LIB_REASON: str | None = None  # None: not loaded yet


def register_family(
    name: str, targets: Sequence[str], self_check: Callable[[], str], *, requires: Sequence[str] = (),
    supported: Callable[[], str] | None = None,
) -> None:
    """Declare a kernel family: its FFI target symbols, its self-check and the families it needs.

    ``self_check()`` runs once, lazily, with the targets registered; it returns
    ``""`` when the kernels agree with a reference, else the reason (an
    exception it raises counts as a failure too). ``supported()``, asked
    first with the library loaded, returns ``""`` when this CPU can run the
    family, else what it lacks: such a family is unavailable without a
    warning and left out of :func:`available` with no family named.
    """
    with _LOCK:
        _FAMILIES[name] = _Family(tuple(targets), self_check, tuple(requires), supported)
        _STATUS.pop(name, None)
        _UNSUPPORTED.pop(name, None)


def _disabled() -> bool:
    return os.environ.get("JAXDSC_DISABLE_NATIVE", "").lower() in ("1", "true", "yes")


def _library_path() -> Path | None:
    override = os.environ.get("JAXDSC_NATIVE_LIB")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package / f"_dwconv{suffix}"
        if candidate.is_file():
            return candidate
    return None


def library_present() -> bool:
    """Whether a library file is there and not disabled (a cheap check: nothing is loaded)."""
    return not _disabled() and _library_path() is not None


def _load() -> str:
    """Load the library once; "" on success, else why not."""
    global _LIB, _LIB_REASON
    with _LOCK:
        if _LIB_REASON is not None:
            return _LIB_REASON
        if _disabled():
            _LIB_REASON = "disabled by JAXDSC_DISABLE_NATIVE"
            return _LIB_REASON
        path = _library_path()
        if path is None:
            _LIB_REASON = _build.not_built_reason(Path(__file__).resolve().parent.parent)
            return _LIB_REASON
        try:
            lib = ctypes.CDLL(str(path))
            if reason := _build.check_library(lib):  # built for another jaxlib's FFI API
                _LIB_REASON = f"{path}: {reason}"
                return _LIB_REASON
            lib.jaxdsc_dw_isa.restype = ctypes.c_char_p
            lib.jaxdsc_dw_set_isa.argtypes = [ctypes.c_char_p]
            lib.jaxdsc_dw_set_isa.restype = ctypes.c_int
            lib.jaxdsc_dw_set_huge_pages.argtypes = [ctypes.c_int]
            lib.jaxdsc_dw_set_huge_pages.restype = ctypes.c_int
        except (OSError, AttributeError) as err:
            _LIB_REASON = f"could not load {path}: {err}"
            return _LIB_REASON
        _LIB, _LIB_REASON = lib, ""
        return ""


def _register_targets(lib: ctypes.CDLL, targets: Sequence[str]) -> str:
    import jax  # registration touches no backend

    try:
        for name in targets:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except (AttributeError, RuntimeError, ValueError) as err:
        return f"targets missing from this build (rebuild the library): {err}"
    return ""


def _run_check(check: Callable[[], str]) -> str:
    import jax

    try:
        # Evaluate now even when first asked from inside a jit trace, on the CPU device.
        # A local device: in a multi-process run jax.devices()[0] may belong to another process.
        with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
            return check()
    except Exception as err:  # any failure here means "do not use these kernels"
        return f"self-check failed to run: {type(err).__name__}: {err}"


def _unsupported(name: str) -> str:
    """What this CPU lacks for family ``name`` ("" when nothing, or when the library is not loaded)."""
    with _LOCK:
        if name not in _UNSUPPORTED:
            family = _FAMILIES[name]
            if _load() or family.supported is None:
                return ""
            _UNSUPPORTED[name] = family.supported()
        return _UNSUPPORTED[name]


def _status(name: str) -> str:
    with _LOCK:
        if name in _STATUS:
            return _STATUS[name]
        if name not in _FAMILIES:
            raise ValueError(f"unknown native kernel family {name!r}; registered: {sorted(_FAMILIES)}")
        family = _FAMILIES[name]
        reason = _load()
        if not reason and (lacks := _unsupported(name)):
            reason = f"not for this CPU: {lacks}"
        for dep in family.requires:
            if not reason and _status(dep):
                reason = f"needs the native {dep!r} kernels: {_status(dep)}"
        if not reason:
            reason = _register_targets(_LIB, family.targets)  # type: ignore[arg-type]
        if not reason:
            reason = _run_check(family.self_check)
            if reason:
                warnings.warn(
                    f"jaxdsc: native {name} kernels disabled: {reason}", RuntimeWarning, stacklevel=4
                )
        _STATUS[name] = reason
        return reason


def _families_for_this_cpu() -> list[str]:
    return [n for n in list(_FAMILIES) if not _unsupported(n)]


def available(family: str | None = None) -> bool:
    """True when ``family`` is loaded and self-checked; with None, every family this CPU can run.

    The first call for a family loads the library and runs its self-check.
    """
    reason = _load()
    if reason:
        if not _disabled():  # JAXDSC_DISABLE_NATIVE: nothing to warn about
            _build.warn_unavailable(reason)
        return False
    names = _families_for_this_cpu() if family is None else [family]
    return all(not _status(n) for n in names)


def unavailable_reason(family: str | None = None) -> str:
    """Why ``family`` (the library, or its first unavailable family this CPU can run, if None)
    cannot run ("" when it can)."""
    if family is not None:
        return _status(family)
    reason = _load()
    if reason:
        return reason
    for n in _families_for_this_cpu():
        if _status(n):
            return f"{n}: {_status(n)}"
    return ""


def library() -> ctypes.CDLL:
    """The loaded library (no self-check); ``RuntimeError`` with the reason when it is not there."""
    reason = _load()
    if reason:
        raise RuntimeError(f"native kernels unavailable: {reason}")
    return _LIB  # type: ignore[return-value]


def isa() -> str:
    """Instruction set the kernels dispatch to: ``"avx512"``, ``"avx2"`` or ``"generic"``."""
    return library().jaxdsc_dw_isa().decode()


def set_isa(name: str) -> None:
    """Force ``"generic"``, ``"avx2"``, ``"avx512"`` or ``"best"`` (for tests and benchmarks).

    Takes effect for calls executed afterwards, jitted or not.
    """
    if not library().jaxdsc_dw_set_isa(name.encode()):
        raise ValueError(
            f"isa must be one of 'generic', 'avx2', 'avx512', 'best' and supported by this CPU, got {name!r}"
        )


def set_huge_pages(on: bool) -> bool:
    """Turn huge-page advice for outputs of 8 MiB or more on or off; return the old setting.

    On by default (``JAXDSC_HUGE_PAGES=0`` starts with it off): the native
    kernels ask Linux to back large outputs with 2 MiB pages
    (``madvise(MADV_HUGEPAGE)``), so a freshly mapped output costs one page
    fault per 2 MiB instead of per 4 KiB (2x faster depthwise forwards with
    32-64 MiB outputs under glibc's default malloc). Advisory; no effect where
    transparent huge pages are off or the output's pages are already mapped.
    """
    lib = library()
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {on!r}")
    return bool(lib.jaxdsc_dw_set_huge_pages(int(on)))
