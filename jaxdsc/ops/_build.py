"""The native library's build record, and whether the running jaxlib can use it.

``setup.py`` compiles ``csrc/`` against the XLA FFI headers of the jaxlib
installed at build time. The library records the FFI C API version of those
headers (``XLA_FFI_API_MAJOR`` / ``XLA_FFI_API_MINOR`` in
``xla/ffi/api/c_api.h``), the jaxlib version and the compiler, and exports them
(``jaxdsc_ffi_api_major`` ...). :func:`check_library` compares that record with
the running jaxlib's headers: a library built for another FFI API is refused
with a message saying how to rebuild, never loaded to fail (or worse, compute)
later. When the build failed or was skipped, ``setup.py`` writes the reason to
``jaxdsc/_native_build.txt`` (next to where the library would be), which
:func:`not_built_reason` reports at first use. See docs/native-build.md.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import re
import warnings
from pathlib import Path
from typing import NamedTuple

FAILURE_RECORD = "_native_build.txt"  # written by setup.py next to the library
REBUILD = "rebuild it: pip install --force-reinstall --no-deps . (or python setup.py build_ext --inplace)"


class BuildInfo(NamedTuple):
    """What a library was built against."""

    ffi_api: tuple[int, int]
    jaxlib: str
    compiler: str


def header_ffi_api(include_dir: str | Path) -> tuple[int, int] | None:
    """``(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR)`` from the headers under ``include_dir``."""
    path = Path(include_dir) / "xla" / "ffi" / "api" / "c_api.h"
    try:
        text = path.read_text()
    except OSError:
        return None
    found = {
        name: int(value) for name, value in re.findall(r"#define\s+XLA_FFI_API_(MAJOR|MINOR)\s+(\d+)", text)
    }
    if set(found) != {"MAJOR", "MINOR"}:
        return None
    return found["MAJOR"], found["MINOR"]


def jaxlib_include_dir() -> Path | None:
    """The XLA FFI headers the installed jaxlib ships (``jax.ffi.include_dir()``, without importing jax)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        return None
    include = Path(spec.origin).parent / "include"
    return include if include.is_dir() else None


def running_ffi_api() -> tuple[int, int] | None:
    """The FFI C API version of the installed jaxlib (None when its headers are absent)."""
    include = jaxlib_include_dir()
    return None if include is None else header_ffi_api(include)


def jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_info(lib: ctypes.CDLL) -> BuildInfo | None:
    """The library's build record (None for a library built before it had one)."""
    try:
        major, minor = lib.jaxdsc_ffi_api_major, lib.jaxdsc_ffi_api_minor
        built_jaxlib, compiler = lib.jaxdsc_built_jaxlib, lib.jaxdsc_built_compiler
    except AttributeError:
        return None
    major.restype = minor.restype = ctypes.c_int
    built_jaxlib.restype = compiler.restype = ctypes.c_char_p
    return BuildInfo((major(), minor()), built_jaxlib().decode(), compiler().decode())


def check_library(lib: ctypes.CDLL) -> str:
    """"" when ``lib`` may run under the installed jaxlib, else why not."""
    info = build_info(lib)
    if info is None:
        return f"the library has no build record (built by an older jaxdsc); {REBUILD}"
    running = running_ffi_api()
    if running is not None and running != info.ffi_api:
        return (
            "the library was built against XLA FFI API {}.{} (jaxlib {}), but the installed jaxlib {} "
            "has FFI API {}.{}; {}".format(*info.ffi_api, info.jaxlib, jaxlib_version(), *running, REBUILD)
        )
    return ""


def not_built_reason(package_dir: Path) -> str:
    """Why ``jaxdsc/_dwconv*.so`` is missing: the reason setup.py recorded, or the usual causes."""
    try:
        recorded = (package_dir / FAILURE_RECORD).read_text().strip()
    except OSError:
        recorded = ""
    if recorded:
        return f"the native build failed at install: {recorded}"
    return (
        "jaxdsc/_dwconv*.so not found: not built (a source checkout needs python setup.py "
        "build_ext --inplace) or its build failed (it needs a C++17 compiler, g++ >= 9 or clang, "
        "and jaxlib's headers at install time)"
    )


_warned: set[str] = set()


def warn_unavailable(reason: str) -> None:
    """Warn once per reason that the native kernels are unavailable, naming why."""
    if not reason or reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"jaxdsc: native CPU kernels unavailable, using the pure-JAX kernels (slower on CPU): {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
