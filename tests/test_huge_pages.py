"""Huge-page advice for large native outputs (csrc/huge_pages.inc).

Each check runs in a fresh process with glibc's default malloc, where a 32 MiB
output is a new mapping: with the advice on (the default) the output is backed
by 2 MiB pages (``AnonHugePages`` in /proc/self/smaps) and still equals the
XLA reference; with ``native.set_huge_pages(False)`` it is not (checked only
where THP is in "madvise" mode, since "always" backs it with huge pages anyway).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdsc.ops import native

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


pytestmark = [
    pytest.mark.skipif(not native.available(), reason="native library not built"),
    pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages here"),
]

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxdsc.ops import depthwise_conv, native

def vmstat(key):
    try:
        for line in open("/proc/vmstat"):
            name, value = line.split()
            if name == key:
                return int(value)
    except OSError:
        pass
    return 0

native.set_huge_pages(sys.argv[1] == "on")
fallback0 = vmstat("thp_fault_fallback")
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((128, 32, 32, 64)), jnp.float32)  # 32 MiB in and out
w = jnp.asarray(rng.standard_normal((3, 3, 1, 64)), jnp.float32)
kw = dict(strides=(1, 1), padding=((1, 1), (2, 0)), dilation=(1, 1))
y = jax.jit(lambda x, w: depthwise_conv(x, w, impl="native", **kw))(x, w).block_until_ready()
fallbacks = vmstat("thp_fault_fallback") - fallback0
start = y.unsafe_buffer_pointer()
end = start + y.nbytes
huge_kb, inside = 0, False
for line in open("/proc/self/smaps"):  # the advice splits the output's mapping: sum the pieces
    head = line.split()[0]
    if "-" in head and ":" not in head:
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo < end and start < hi
    elif inside and line.startswith("AnonHugePages:"):
        huge_kb += int(line.split()[1])
ref = jax.jit(lambda x, w: depthwise_conv(x, w, impl="xla", **kw))(x, w)
err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
print(json.dumps({"huge_kb": huge_kb, "rel_err": err, "fallbacks": fallbacks}))
"""


def _run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXDSC_HUGE_PAGES")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_large_output_is_backed_by_huge_pages_and_correct() -> None:
    out = _run("on")
    assert out["rel_err"] <= 1e-5  # float32, 9 taps: ~1e-7 observed
    if out["huge_kb"] == 0 and out["fallbacks"] > 0:
        pytest.skip("the kernel took the advice but had no free huge pages (thp_fault_fallback)")
    # At least one 2 MiB page; ~30 MiB when the kernel had free huge pages.
    assert out["huge_kb"] >= 2048, out


@pytest.mark.skipif(_thp_mode() != "madvise", reason="THP 'always' backs the output anyway")
def test_advice_can_be_turned_off() -> None:
    out = _run("off")
    assert out["rel_err"] <= 1e-5
    assert out["huge_kb"] == 0, out


def test_set_huge_pages_validates_and_restores() -> None:
    with pytest.raises(TypeError, match="on must be a bool, got 1"):
        native.set_huge_pages(1)  # type: ignore[arg-type]
    before = native.set_huge_pages(False)
    try:
        assert native.set_huge_pages(True) is False
    finally:
        native.set_huge_pages(before)
