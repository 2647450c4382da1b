"""Build step for the optional native CPU depthwise-conv kernel (jaxdsc/_dwconv*.so).

The project metadata lives in pyproject.toml; this file only adds the C++
extension. It is built by ``pip install [-e] .`` with the system C++ compiler
(g++ >= 9 or clang, C++17) against the XLA FFI headers that jaxlib ships
(``jax.ffi.include_dir()``; jaxlib is a build requirement in pyproject.toml).
The extension is optional: if jaxlib's headers are missing or the compiler
fails, installation still succeeds and jaxdsc falls back to its pure-JAX
kernels, but says so: a warning here (pip shows it with ``-v``), the reason
written to ``jaxdsc/_native_build.txt``, and a warning naming it when the
kernels are first wanted. The library records the XLA FFI API version and the
jaxlib it was built against (``csrc/build_info.cc``); jaxdsc refuses it under a
jaxlib with another FFI API. Any C++17 compiler works: ``CC=clang
CXX=clang++ pip install .``. It is a plain shared library (loaded with ctypes,
never imported). See docs/native-build.md.
"""

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FAILURE_RECORD = "_native_build.txt"  # read by jaxdsc/ops/_build.py


def _ffi_include_dir() -> str | None:
    """jaxlib's bundled XLA FFI headers (what ``jax.ffi.include_dir()`` returns)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        return None
    include = Path(spec.origin).parent / "include"
    return str(include) if (include / "xla" / "ffi" / "api" / "ffi.h").is_file() else None


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


FFI_INCLUDE = _ffi_include_dir()

dwconv = Extension(
    "jaxdsc._dwconv",
    sources=[
        "csrc/dwconv_ffi.cc",
        "csrc/dwconv_generic.cc",
        "csrc/dwconv_avx2.cc",
        "csrc/dwconv_avx512.cc",
        "csrc/pwconv_bf16.cc",
        "csrc/build_info.cc",
    ],
    include_dirs=["csrc"],
    define_macros=[("JAXDSC_JAXLIB_VERSION", f'"{_jaxlib_version()}"')],
    depends=[
        "csrc/chan_merge.h",
        "csrc/dwconv.h",
        "csrc/ffi_binding.h",
        "csrc/dwconv_kernels.inc",
        "csrc/dwconv_common.inc",
        "csrc/dwconv_rows.inc",
        "csrc/dwconv_drivers.inc",
        "csrc/pwconv_kernels.inc",
        "csrc/pwconv_ffi.inc",
        "csrc/pwconv_bf16_ffi.inc",
        "csrc/pwbf16.h",
        "csrc/dense_ffi.inc",
        "csrc/dense_kernels.inc",
        "csrc/bn_kernels.inc",
        "csrc/bn_ffi.inc",
        "csrc/sepconv_ffi.inc",
        "csrc/parallel_for.inc",
        "csrc/huge_pages.inc",
    ],
    language="c++",
    extra_compile_args=[
        "-std=c++17",
        # XLA's headers as system headers: their warnings are not ours.
        *([f"-isystem{FFI_INCLUDE}"] if FFI_INCLUDE else []),
        "-O3",
        "-fvisibility=hidden",
        # FMA contraction: ISO mode (-std=c++17) turns it off otherwise.
        "-ffp-contract=fast",
        "-fno-math-errno",
        "-Wno-unused-function",
    ],
    extra_link_args=["-pthread"],
)


class BuildNative(build_ext):
    """Builds the library if it can; otherwise warns, naming why, and records the reason."""

    def build_extension(self, ext: Extension) -> None:
        record = Path(self.get_ext_fullpath(ext.name)).parent / FAILURE_RECORD
        if FFI_INCLUDE is None:
            reason = "jaxlib's XLA FFI headers were not found (jaxlib >= 0.4.31 must be installed when building)"
        else:
            try:
                super().build_extension(ext)
            except Exception as err:  # any compiler or linker failure: the library is optional
                compiler = " ".join(getattr(self.compiler, "compiler_so", ["?"])[:1])
                reason = f"compiling csrc/ with {compiler} failed ({err}); the compiler's messages are above"
            else:
                record.unlink(missing_ok=True)
                return
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(reason + "\n")
        bar = "=" * 78
        print(
            f"{bar}\nWARNING: jaxdsc's native CPU kernels were NOT built: {reason}.\n"
            "jaxdsc still works, with its pure-JAX kernels (slower on CPU). Retry with\n"
            "python setup.py build_ext --inplace (any C++17 compiler: CC=clang CXX=clang++ works).\n"
            f"{bar}",
            file=sys.stderr,
        )


setup(ext_modules=[dwconv], cmdclass={"build_ext": BuildNative})
