"""train.malloc: the allocator settings the trainer applies at start-up (in a subprocess: they are process-wide)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

SNIPPET = "import json, train.malloc as m; print(json.dumps(m.tune())); print(json.dumps(m.status))"
OPTIONS = ("trim_threshold", "mmap_threshold", "arena_max")
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _tune(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXDSC_MALLOC")}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == out[1]  # status keeps what tune() returned
    result = json.loads(out[0])
    assert tuple(result) == OPTIONS  # one entry per option, always
    return result


@glibc_only
def test_tune_applies_each_option_on_glibc():
    assert _tune() == {"trim_threshold": "set to 2147483647", "mmap_threshold": "set to 2147483647",
                       "arena_max": "set to 1"}


def test_opt_out():
    assert set(_tune(JAXDSC_MALLOC="default").values()) == {"default ($JAXDSC_MALLOC=default)"}


@glibc_only
def test_user_tunables_win_option_by_option():
    got = _tune(GLIBC_TUNABLES="glibc.malloc.arena_max=2:glibc.rtld.nns=2")
    assert got == {"trim_threshold": "set to 2147483647", "mmap_threshold": "set to 2147483647",
                   "arena_max": "from $GLIBC_TUNABLES"}


@glibc_only
def test_a_refused_option_does_not_stop_the_others(monkeypatch):
    # mallopt refuses M_MMAP_THRESHOLD above HEAP_MAX_SIZE / 2 on glibc builds that cap it; emulate a refusal.
    import train.malloc as m

    calls = []

    class FakeLibc:
        @staticmethod
        def mallopt(param, value):
            calls.append(param)
            return 0 if param == m.OPTIONS["mmap_threshold"][0] else 1

    monkeypatch.setattr(m.ctypes, "CDLL", lambda name: FakeLibc)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JAXDSC_MALLOC", raising=False)
    got = m._tune()
    assert len(calls) == 3  # every option was tried
    assert got["mmap_threshold"].startswith("refused by mallopt")
    assert got["trim_threshold"] == "set to 2147483647" and got["arena_max"] == "set to 1"
