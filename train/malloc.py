"""Keep glibc malloc from handing big buffers back to the OS between training steps.

Out of the box, glibc returns every freed buffer above ``mmap_threshold`` (and
the top of each heap above ``trim_threshold``) to the kernel, so XLA's and
PyTorch's per-step activations are faulted in page by page on every step:
half the CPU time of a small-net training step (shared/perf-probe REPORT.md,
"allocator effects"). Measured here (one epoch of ``--preset cifar10-cpu``,
2 cores): 518 img/s out of the box, 966 img/s after :func:`tune`, 988 img/s with
the equivalent ``GLIBC_TUNABLES``. The price: the process keeps its peak heap.

The trainer calls :func:`tune` at start-up, before XLA starts its threads.
Each option is applied on its own and
:data:`status` says, per option, whether it took effect. ``JAXDSC_MALLOC=default``
skips them all; an option that ``GLIBC_TUNABLES`` already sets is left alone
(the user's choice wins), the others are still applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "JAXDSC_MALLOC"

_LARGE = 2**31 - 1  # an int: mallopt takes one; far above any activation buffer

# name (as in GLIBC_TUNABLES: glibc.malloc.NAME) -> (mallopt(3) parameter number from malloc.h, value)
OPTIONS: dict[str, tuple[int, int]] = {
    "trim_threshold": (-1, _LARGE),
    "mmap_threshold": (-3, _LARGE),
    # One arena: XLA worker threads otherwise get their own 64 MiB heaps, whose buffers still fault.
    "arena_max": (-8, 1),
}

status: dict[str, str] = dict.fromkeys(OPTIONS, "not tuned")
"""What the last :func:`tune` did, per option: ``"set to V"`` or why not; recorded in summary.json."""


def tune() -> dict[str, str]:
    """Apply each option on its own; returns (and keeps in ``status``) the outcome per option."""
    global status
    status = _tune()
    return status


def _user_tunables() -> set[str]:
    """The malloc options ``GLIBC_TUNABLES`` sets (``glibc.malloc.arena_max=2:...`` -> {"arena_max"})."""
    names = set()
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        key = item.partition("=")[0].strip()
        if key.startswith("glibc.malloc."):
            names.add(key.removeprefix("glibc.malloc."))
    return names


def _tune() -> dict[str, str]:
    if os.environ.get(ENV_VAR, "").lower() == "default":
        return dict.fromkeys(OPTIONS, f"default (${ENV_VAR}=default)")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return dict.fromkeys(OPTIONS, "default (not glibc)")
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    user = _user_tunables()
    out = {}
    for name, (param, value) in OPTIONS.items():
        if name in user:  # the user's choice wins, option by option
            out[name] = "from $GLIBC_TUNABLES"
        elif mallopt(param, value) == 1:
            out[name] = f"set to {value}"
        else:
            out[name] = f"refused by mallopt (value {value}); glibc default kept"
    return out
