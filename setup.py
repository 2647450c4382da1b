"""Build step for the optional native CPU depthwise-conv kernel (jaxdsc/_dwconv*.so).

The project metadata lives in pyproject.toml; this file only adds the C++
extension. It is built by ``pip install [-e] .`` with the system C++ compiler
(g++ >= 9 or clang, C++17) against the XLA FFI headers that jaxlib ships
(``jax.ffi.include_dir()``; jaxlib is a build requirement in pyproject.toml).
The extension is optional: if jaxlib's headers are missing or the compiler
fails, installation still succeeds and jaxdsc falls back to its pure-JAX
kernels. It is a plain shared library (loaded with
ctypes, never imported).
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup


def _ffi_include_dir() -> str | None:
    """jaxlib's bundled XLA FFI headers (what ``jax.ffi.include_dir()`` returns)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        return None
    include = Path(spec.origin).parent / "include"
    return str(include) if (include / "xla" / "ffi" / "api" / "ffi.h").is_file() else None


FFI_INCLUDE = _ffi_include_dir()

dwconv = Extension(
    "jaxdsc._dwconv",
    sources=[
        "csrc/dwconv_ffi.cc",
        "csrc/dwconv_generic.cc",
        "csrc/dwconv_avx2.cc",
        "csrc/dwconv_avx512.cc",
    ],
    include_dirs=["csrc"],
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
        f"-isystem{FFI_INCLUDE}",
        "-O3",
        "-fvisibility=hidden",
        # FMA contraction: ISO mode (-std=c++17) turns it off otherwise.
        "-ffp-contract=fast",
        "-fno-math-errno",
        "-Wno-unused-function",
    ],
    extra_link_args=["-pthread"],
    optional=True,
)

if FFI_INCLUDE is None:
    print("jaxdsc: jaxlib's XLA FFI headers not found; skipping the native kernel")
setup(ext_modules=[dwconv] if FFI_INCLUDE else [])
