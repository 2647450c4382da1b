"""train.malloc: the allocator settings the trainer applies at start-up (in a subprocess: they are process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = "import train.malloc as m; print(m.tune()); print(m.status)"


def _tune(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXDSC_MALLOC")}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == out[1]  # status keeps what tune() returned
    return out


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_applies_on_glibc():
    assert _tune()[0] == "malloc keeps freed buffers (see train/malloc.py)"


def test_opt_out_and_user_settings_win():
    assert _tune(JAXDSC_MALLOC="default")[0] == "default malloc ($JAXDSC_MALLOC=default)"
    assert _tune(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] == "malloc settings from $GLIBC_TUNABLES"
