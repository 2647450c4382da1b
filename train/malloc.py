"""Keep glibc malloc from handing big buffers back to the OS between training steps.

Out of the box, glibc returns every freed buffer above ``mmap_threshold`` (and
the top of each heap above ``trim_threshold``) to the kernel, so XLA's and
PyTorch's per-step activations are faulted in page by page on every step:
half the CPU time of a small-net training step (shared/perf-probe REPORT.md,
"allocator effects"). Measured here (one epoch of ``--preset cifar10-cpu``,
2 cores): 518 img/s out of the box, 966 img/s after :func:`tune`, 988 img/s with
the equivalent ``GLIBC_TUNABLES``. The price: the process keeps its peak heap.

The trainer calls :func:`tune` at start-up, before XLA starts its threads.
``JAXDSC_MALLOC=default`` skips it, and so does a ``GLIBC_TUNABLES`` that
already sets malloc options (the user's choice wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "JAXDSC_MALLOC"

# mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_LARGE = 2**31 - 1  # an int: mallopt takes one; far above any activation buffer

status = "not tuned"  # what the last tune() did; recorded in summary.json


def tune() -> str:
    """Apply the settings; returns (and keeps in ``status``) what was done, as a short phrase."""
    global status
    status = _tune()
    return status


def _tune() -> str:
    if os.environ.get(ENV_VAR, "").lower() == "default":
        return f"default malloc (${ENV_VAR}=default)"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc settings from $GLIBC_TUNABLES"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default malloc (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_TRIM_THRESHOLD, _LARGE),
        (_M_MMAP_THRESHOLD, _LARGE),
        # One arena: XLA worker threads otherwise get their own 64 MiB heaps, whose buffers still fault.
        (_M_ARENA_MAX, 1),
    ))
    return "malloc keeps freed buffers (see train/malloc.py)" if ok else "malloc tuning partly refused"
