"""The native library's build, build record and load-time checks (issue 20).

* the library records the XLA FFI API version and jaxlib it was built against,
  and the loader refuses it, with a message that says how to rebuild, under a
  jaxlib whose FFI API differs (and refuses a library without a record);
* a failed build says so: setup.py warns, naming why, and records the reason,
  which is what jaxdsc reports when the kernels are first wanted (one warning);
* CI's guard: with ``JAXDSC_REQUIRE_NATIVE=1`` a test run without working
  native kernels fails at once instead of skipping their tests;
* clang builds it too (opt-in, minutes: ``JAXDSC_TEST_CLANG=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdsc.ops import _build, native

ROOT = Path(__file__).resolve().parent.parent
_LOAD_REASON = native._load()  # loads the library only (no family registered or checked)
needs_library = pytest.mark.skipif(bool(_LOAD_REASON), reason=f"no native library: {_LOAD_REASON}")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "JAXDSC_DISABLE_NATIVE"}
    full_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_header_version_parsing(tmp_path):
    api = tmp_path / "xla" / "ffi" / "api"
    api.mkdir(parents=True)
    (api / "c_api.h").write_text("#define XLA_FFI_API_MAJOR 1\n// x\n#define  XLA_FFI_API_MINOR   27\n")
    assert _build.header_ffi_api(tmp_path) == (1, 27)
    (api / "c_api.h").write_text("#define XLA_FFI_API_MAJOR 1\n")
    assert _build.header_ffi_api(tmp_path) is None
    assert _build.header_ffi_api(tmp_path / "missing") is None


@needs_library
def test_library_records_what_it_was_built_against():
    info = _build.build_info(native._LIB)
    assert info is not None
    assert info.ffi_api == _build.running_ffi_api()
    assert info.jaxlib == _build.jaxlib_version()
    assert info.compiler.split()[0] in ("g++", "clang")
    assert _build.check_library(native._LIB) == ""


@needs_library
def test_refuses_a_jaxlib_with_another_ffi_api(monkeypatch):
    info = _build.build_info(native._LIB)
    monkeypatch.setattr(_build, "running_ffi_api", lambda: (info.ffi_api[0] + 1, 0))
    reason = _build.check_library(native._LIB)
    assert f"built against XLA FFI API {info.ffi_api[0]}.{info.ffi_api[1]}" in reason
    assert f"has FFI API {info.ffi_api[0] + 1}.0" in reason
    assert "rebuild" in reason
    # The loader itself refuses it (asked afresh: the loaded library is cached).
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_LIB_REASON", None)
    why = native._load()
    assert native._LIB is None and reason in why


def test_refuses_a_library_without_build_record():
    assert "no build record" in _build.check_library(object())


def test_unavailable_kernels_warn_once_naming_why():
    code = (
        "import warnings, jax.numpy as jnp\n"
        "warnings.simplefilter('always')\n"
        "from jaxdsc.ops import native, pointwise_conv\n"
        "x, w = jnp.ones((1, 64, 64, 2)), jnp.ones((2, 3))  # large enough for 'auto' to want native\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    for _ in range(3):\n"
        "        pointwise_conv(x, w)\n"
        "print(len([m for m in seen if 'native CPU kernels unavailable' in str(m.message)]))\n"
        "print(native.unavailable_reason())\n"
    )
    out = _python(code, JAXDSC_NATIVE_LIB=str(ROOT / "no-such-library.so"))
    assert out.returncode == 0, out.stderr
    count, reason = out.stdout.strip().splitlines()
    assert count == "1"
    assert "no-such-library.so" in reason
    # Asked-for fallback: no warning.
    out = _python(code, JAXDSC_DISABLE_NATIVE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "0"


def test_failed_build_warns_and_records_why(tmp_path):
    """A compiler that fails: the install still succeeds, warns and records the reason."""
    env = {**os.environ, "CC": "false", "CXX": "false"}
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "WARNING: jaxdsc's native CPU kernels were NOT built: compiling csrc/ with false failed" in out.stderr
    package = tmp_path / "lib" / "jaxdsc"
    assert not list(package.glob("_dwconv*"))
    reason = _build.not_built_reason(package)
    assert reason.startswith("the native build failed at install: compiling csrc/ with false failed")
    assert "not found" in _build.not_built_reason(tmp_path)  # nothing recorded: the usual causes


def test_require_native_turns_missing_kernels_into_a_failure():
    """CI sets JAXDSC_REQUIRE_NATIVE=1: the run fails at once, naming why, instead of skipping."""
    env = {**os.environ, "JAXDSC_REQUIRE_NATIVE": "1", "JAXDSC_DISABLE_NATIVE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
         "tests/test_native_build.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    assert "JAXDSC_REQUIRE_NATIVE" in out.stdout + out.stderr
    assert "disabled by JAXDSC_DISABLE_NATIVE" in out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JAXDSC_TEST_CLANG") != "1", reason="opt-in (minutes): JAXDSC_TEST_CLANG=1")
@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
def test_clang_build_passes_the_self_checks(tmp_path):
    env = {**os.environ, "CC": "clang", "CXX": "clang++"}
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert out.returncode == 0 and "NOT built" not in out.stderr, out.stderr
    (lib,) = (tmp_path / "lib" / "jaxdsc").glob("_dwconv*.so")
    code = (
        "from jaxdsc.ops import _build, native, native_depthwise, separable\n"
        "assert native.available(), native.unavailable_reason()\n"
        "assert native.available('pointwise') and native.available('batchnorm')\n"
        "assert separable.fused_available()\n"
        "print(_build.build_info(native.library()).compiler)\n"
        "for isa in ('generic', 'avx2', 'avx512'):\n"
        "    try:\n"
        "        native.set_isa(isa)\n"
        "    except ValueError:\n"
        "        continue\n"
        "    assert native_depthwise.self_check() == '', isa\n"
    )
    run = _python(code, JAXDSC_NATIVE_LIB=str(lib))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("clang ")


@needs_library
def test_every_ffi_target_is_exported_and_checks_out():
    """One binding pattern for all targets (csrc/ffi_binding.h): each is exported, and the
    self-checks call each one (operands, results and named attributes) against numpy
    (the fused separable forward: tests/test_ops_separable.py)."""
    from jaxdsc.ops import batchnorm, native_depthwise, native_pointwise, separable

    lib = native.library()
    for name in (*native_depthwise.TARGETS, *native_pointwise.TARGETS, *native_pointwise.BF16_TARGETS,
                 *batchnorm.TARGETS, separable.SEP_TARGET,
                 "jaxdsc_bf16mm_isa", "jaxdsc_bf16mm_best_isa", "jaxdsc_bf16mm_set_isa"):
        assert hasattr(lib, name), name
    # Registers each family's targets and runs its self-check (once, cached) ...
    for family in (native_depthwise, native_pointwise, batchnorm, separable):
        assert native.available(family.FAMILY), native.unavailable_reason(family.FAMILY)
    # ... and each check, run again here, still passes.
    for family in (native_depthwise, native_pointwise, batchnorm, separable):
        assert family.self_check() == "", family.FAMILY


@needs_library
def test_a_family_this_cpu_cannot_run_is_left_out_quietly(recwarn):
    """A family whose hardware the CPU lacks (the bfloat16-product GEMMs without AMX or AVX512-BF16)
    is unavailable, naming what is missing, without a self-check or a warning, and ``available()``
    with no family still says yes for the rest; a supported family that fails its check still counts."""
    before = native.available()
    calls = []

    def check() -> str:
        calls.append(1)
        return ""

    try:
        native.register_family("_test_lacks", (), check, supported=lambda: "a made-up ISA")
        assert not native.available("_test_lacks")
        assert native.unavailable_reason("_test_lacks") == "not for this CPU: a made-up ISA"
        assert native.available() == before and native.unavailable_reason() == ""
        assert not calls and not [w for w in recwarn if "_test_lacks" in str(w.message)]
        native.register_family("_test_fails", (), lambda: "disagrees", supported=lambda: "")
        with pytest.warns(RuntimeWarning, match="_test_fails kernels disabled: disagrees"):
            assert not native.available()
        assert native.unavailable_reason() == "_test_fails: disagrees"
    finally:
        for name in ("_test_lacks", "_test_fails"):
            native._FAMILIES.pop(name, None)
            native._STATUS.pop(name, None)
            native._UNSUPPORTED.pop(name, None)
    assert native.available() == before
