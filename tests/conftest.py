"""Shared helpers for the parity, gradient and round-trip tests.

Layout helpers (NHWC <-> NCHW), running a JAX module and its PyTorch twin on
the same input, bit-exact state comparison, and an ``x64`` fixture that
enables ``jax_enable_x64`` only for the duration of one test (a scoped
``jax.enable_x64(True)`` context, so other tests in the same worker keep the
float32 default).

Tolerances used throughout (relative to ``max |reference|``):

* ``RTOL32 = 1e-5``: float32 has a unit roundoff of 6e-8; a conv output is a
  sum of at most a few hundred products, and XLA and PyTorch (oneDNN) sum in
  different orders, so errors of a few 1e-7 relative to the output's scale are
  expected. 1e-5 leaves a 10-50x margin yet catches any wrong tap, offset,
  padding value or channel order (those give errors of order 1).
* ``RTOL64 = 1e-10``: the same reasoning with unit roundoff 1.1e-16.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxdsc
import torch_bridge
from jaxdsc.conv import pad_input
from jaxdsc.ops import depthwise as depthwise_ops
from jaxdsc.ops.depthwise import IMPLS, DepthwiseCall

RTOL32 = 1e-5
RTOL64 = 1e-10

# Every registered depthwise implementation plus the automatic choice; fast
# paths registered later by jaxdsc.ops are picked up without editing the tests.
IMPL_NAMES: list[str] = [*sorted(IMPLS), "auto"]


# ---------------------------------------------------------------- layouts
def to_nchw(a: Any) -> np.ndarray:
    """Channels-last ``(N, *spatial, C)`` -> channels-first ``(N, C, *spatial)``."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1))


def to_nhwc(a: Any) -> np.ndarray:
    """Channels-first ``(N, C, *spatial)`` -> channels-last ``(N, *spatial, C)``."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))


def torch_input(x_nhwc: np.ndarray, *, requires_grad: bool = False) -> torch.Tensor:
    t = torch.from_numpy(to_nchw(x_nhwc))
    return t.requires_grad_(requires_grad)


def random_input(shape: tuple[int, ...], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def np_init(seed: int = 0, scale: float = 0.5) -> Any:
    """An ``nnx`` initializer drawing from NumPy: no XLA compile per parameter shape
    (``jax.random`` compiles one kernel per shape, a large share of the suite's time
    otherwise). Non-zero, so it also exercises biases."""

    def init(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        rng = np.random.default_rng([seed, *shape])
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    return init


def init_kwargs(seed: int = 0) -> dict[str, Any]:
    """``kernel_init`` / ``bias_init`` / ``rngs`` for the conv modules, built from NumPy."""
    return {"kernel_init": np_init(seed), "bias_init": np_init(seed + 1), "rngs": nnx.Rngs(seed)}


# ---------------------------------------------------------------- running twins
@nnx.jit
def _jitted_call(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)


def jax_call(module: nnx.Module, x: Any) -> jax.Array:
    """``module(x)`` under ``nnx.jit`` (BatchNorm statistics updates propagate back).

    Jitted because that is how models run, and because one compile of the whole
    call is much cheaper than eager dispatch of the fast paths' many small ops.
    One shared jitted function, so repeated calls with the same structure and
    shapes (train steps, equal modules) reuse the compiled program.
    """
    return _jitted_call(module, jnp.asarray(x))


def run_twins(module: nnx.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
    """Run a JAX module and its PyTorch twin on the same input.

    The twin is built *before* the JAX call, so in train mode both start from
    the same BatchNorm statistics. Returns (JAX output, torch output in the
    JAX layout, twin).
    """
    twin = torch_bridge.to_torch(module)
    with torch.no_grad():
        yt = twin(torch_input(x))
    yj = jax_call(module, x)
    yt_np = yt.numpy()
    if yt_np.ndim > 2:
        yt_np = to_nhwc(yt_np)
    return np.asarray(yj), yt_np, twin


def rel_err(actual: Any, reference: Any) -> float:
    """``max |actual - reference| / max |reference|`` (0 for an all-zero reference that matches)."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    scale = np.abs(r).max() if r.size else 0.0
    diff = np.abs(a - r).max() if r.size else 0.0
    if scale == 0.0:
        return float(diff)
    return float(diff / scale)


def assert_close(actual: Any, reference: Any, rtol: float, what: str = "output") -> float:
    """Shapes and dtypes must agree; max abs error <= ``rtol * max|reference|``."""
    a, r = np.asarray(actual), np.asarray(reference)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != {r.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = rel_err(a, r)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.0e}"
    return err


def assert_parity(module: nnx.Module, x: np.ndarray, rtol: float) -> float:
    """Forward parity of ``module`` and its twin; also checks the output dtype agrees."""
    yj, yt, _ = run_twins(module, x)
    assert yj.dtype == yt.dtype, f"dtype {yj.dtype} (JAX) != {yt.dtype} (torch)"
    return assert_close(yj, yt, rtol)


# ---------------------------------------------------------------- state comparison
def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (dtype, shape and bytes; NaN payloads and -0.0 included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_state(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not same_bits(a[k], b[k])]
    assert not bad, f"tensors differ: {bad}"


def torch_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: torch_bridge.convert.tensor_to_numpy(v) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- implementations
def depthwise_call(module: jaxdsc.DepthwiseConv, x: Any) -> DepthwiseCall:
    """The static call ``module(x)`` makes to ``depthwise_conv`` (what ``supports()`` sees)."""
    x = jnp.asarray(x)
    xp, pairs = pad_input(x, module.padding, module.kernel_size, module.strides, module.kernel_dilation)
    dtype = jnp.dtype(module.dtype) if module.dtype is not None else jnp.result_type(x, module.kernel[...])
    kernel = jax.ShapeDtypeStruct(module.kernel[...].shape, dtype)
    xp = jax.ShapeDtypeStruct(xp.shape, dtype)
    make_call = getattr(depthwise_ops, "make_call", None)
    if make_call is not None:  # the ops module's own description of the call
        return make_call(xp, kernel, strides=module.strides, padding=pairs, dilation=module.kernel_dilation)
    return DepthwiseCall(
        rank=len(module.kernel_size),
        channels=module.in_features,
        depth_multiplier=module.depth_multiplier,
        kernel_size=module.kernel_size,
        strides=module.strides,
        dilation=module.kernel_dilation,
        padding=tuple(pairs),
        dtype=dtype,
        backend=jax.default_backend(),
    )


def skip_unsupported(impl: str, module: jaxdsc.DepthwiseConv, x: Any) -> None:
    """Skip the test when a named implementation declines this call (``"auto"`` never does)."""
    if impl != "auto" and not IMPLS[impl].supports(depthwise_call(module, x)):
        pytest.skip(f"impl={impl!r} does not support this call")


def impl_supported(impl: str, module: jaxdsc.DepthwiseConv, x: Any) -> bool:
    return impl == "auto" or IMPLS[impl].supports(depthwise_call(module, x))


# ---------------------------------------------------------------- native guard
def pytest_sessionstart(session: pytest.Session) -> None:
    """``JAXDSC_REQUIRE_NATIVE=1`` (CI): no working native kernels fails the run, naming why.

    Without it the native tests skip where the library is missing (a source
    checkout without a compiler), which would let a broken build pass CI.
    """
    if os.environ.get("JAXDSC_REQUIRE_NATIVE", "0") in ("", "0"):
        return
    import jaxdsc.ops  # noqa: F401  (every kernel family registers itself with the loader)
    from jaxdsc.ops import native

    families = {
        "depthwise": "depthwise",
        "pointwise": "pointwise",
        "batch norm": "batchnorm",
        "fused separable": "separable",
        "dense conv": "dense",
    }
    missing = [name for name, family in families.items() if not native.available(family)]
    if missing:
        why = (native.unavailable_reason(families[missing[0]])
               or "failed their self-check or are missing from this build")
        pytest.exit(
            f"JAXDSC_REQUIRE_NATIVE is set but the native {', '.join(missing)} kernels are unavailable: {why}",
            returncode=1,
        )


# ---------------------------------------------------------------- fixtures
@contextlib.contextmanager
def x64_enabled() -> Iterator[None]:
    """float64 in JAX for the body only (thread-local config context)."""
    with jax.enable_x64(True):
        yield


ISAS = ("generic", "avx2", "avx512")


@contextlib.contextmanager
def native_isa(isa: str) -> Iterator[None]:
    """The native kernels on instruction set ``isa`` for the body (skip when this CPU lacks it)."""
    from jaxdsc.ops import native

    try:
        native.set_isa(isa)
    except ValueError:
        pytest.skip(f"{isa} not supported by this CPU")
    try:
        yield
    finally:
        native.set_isa("best")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """One PyTorch intra-op thread in each test process (set before every test: a benchmark's
    ``--threads`` may have changed it).

    The suite's tensors are small, so extra OpenMP threads buy nothing, and with ``-n 2`` workers
    on 2 cores (CI) or beside other load they oversubscribe the cores: OpenMP's spinning barriers
    then stall. Measured on a loaded 2-core machine: the float64 DeepLabV3+ forward of
    test_zoo_deeplabv3plus took 58 s with 2 threads and 0.05 s with 1. Results are unchanged
    up to summation order, which every tolerance already allows.
    """
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def x64() -> Iterator[None]:
    """Run the test with ``jax_enable_x64``; restored afterwards."""
    with x64_enabled():
        yield


@pytest.fixture
def rngs() -> nnx.Rngs:
    return nnx.Rngs(0)


@pytest.fixture(scope="session")
def session_shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this session sees (the workers' basetemps' parent; the basetemp
    without xdist): expensive fixtures are built there once, under a ``filelock.FileLock``."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


PERSISTENT_CACHE_NAMES = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                          "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def persistent_compile_cache(path: Path) -> Iterator[dict[str, str]]:
    """JAX's persistent compilation cache in ``path`` for the body, every program cached; yields the
    environment that gives subprocesses the same cache.

    Reruns of one configuration (a run resumed in-process, a subprocess of the same trainer) then
    load their programs instead of compiling them again. A cached program is the same binary, so
    results are unchanged. Restored afterwards: other tests of the worker keep JAX's defaults.
    """
    from jax._src import compilation_cache

    values = (str(path), 0.0, 0)
    before = [getattr(jax.config, name) for name in PERSISTENT_CACHE_NAMES]
    for name, value in zip(PERSISTENT_CACHE_NAMES, values, strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # JAX reads the settings once per process
    try:
        # A JAX option's environment variable is its name in upper case.
        yield {name.upper(): str(value) for name, value in zip(PERSISTENT_CACHE_NAMES, values, strict=True)}
    finally:
        for name, value in zip(PERSISTENT_CACHE_NAMES, before, strict=True):
            jax.config.update(name, value)
        compilation_cache.reset_cache()
