"""Every pointwise (1x1) implementation against a float64 reference (issue 5).

``y = x . w + b`` on ``(N, *spatial, C_in)``, and its VJP (input, kernel and
bias gradients) under ``jax.jit``, for ranks 1-3, odd channel counts (tile
and panel remainders of the native GEMM), with and without bias, in float32
and bfloat16; second-order gradients; ``"auto"`` selection, fallback without
the native library, every instruction set of the native kernels, vmap, empty
batches and determinism. Tolerances are relative to the largest reference
magnitude:

* float32: 1e-5. Each output sums C_in products (each weight-gradient entry
  N*spatial of them) in some order; observed errors are below 1e-6.
* bfloat16: 1e-2, against the float64 result of the bfloat16-rounded
  inputs. Every path accumulates in float32 and rounds the result once to
  bfloat16 (2**-8 = 3.9e-3 relative at most).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ISAS, native_isa

from jaxdsc.ops import native, native_pointwise, pointwise_conv
from jaxdsc.ops.pointwise import NATIVE_MIN_ROWS, PW_IMPLS, select_pointwise_impl

IMPLS = [i for i in PW_IMPLS if i != "native" or native.available("pointwise")]
needs_native = pytest.mark.skipif(
    not native.available("pointwise"),
    reason=f"native pointwise GEMM unavailable: {native.unavailable_reason() or 'old build'}",
)

# (x shape, C_out): ranks 1-3; C_in / C_out around the register tile sizes
# (16-float vectors, panels of 16-64 columns, tiles of 4-12 rows) and M
# (= N * spatial) not a multiple of any tile height.
CASES = [
    ((3, 7, 5), 3),
    ((2, 5, 3, 17), 33),
    ((2, 3, 2, 4, 7), 19),
    ((2, 9, 7, 64), 64),
    ((1, 13, 11, 32), 32),
    ((3, 5, 5, 100), 70),
    ((2, 4, 4, 130), 48),
    ((1, 3, 3, 48), 129),
    ((4, 40, 40, 24), 40),  # M = 6400: several row tasks and weight-gradient tasks
]


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    return float(
        np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30)
    )


def _operands(seed, shape, c_out, dtype, bias=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(rng.standard_normal((shape[-1], c_out)) / np.sqrt(shape[-1]), dtype)
    b = jnp.asarray(rng.standard_normal(c_out), dtype) if bias else None
    g = jnp.asarray(rng.standard_normal((*shape[:-1], c_out)), dtype)
    return x, w, b, g


def _run(impl, x, w, b, g, precision=None):
    """(y, dx, dw[, db]) of one implementation under jit."""

    def f(x, w, b, g):
        if b is None:
            y, vjp = jax.vjp(lambda x, w: pointwise_conv(x, w, impl=impl, precision=precision), x, w)
        else:
            y, vjp = jax.vjp(lambda x, w, b: pointwise_conv(x, w, b, impl=impl, precision=precision), x, w, b)
        return (y, *vjp(g))

    return jax.jit(f)(x, w, b, g)


def _reference(x, w, b, g):
    x64, w64, g64 = (np.asarray(v, np.float64) for v in (x, w, g))
    k, n = w64.shape
    x2, g2 = x64.reshape(-1, k), g64.reshape(-1, n)
    y = x64 @ w64 + (0.0 if b is None else np.asarray(b, np.float64))
    out = [y, g64 @ w64.T, x2.T @ g2]
    if b is not None:
        out.append(g2.sum(0))
    return out


def _check(impl, shape, c_out, dtype=jnp.float32, tol=1e-5, bias=True, seed=0):
    x, w, b, g = _operands(seed, shape, c_out, dtype, bias)
    got = _run(impl, x, w, b, g)
    ref = _reference(x, w, b, g)
    assert len(got) == len(ref)
    for name, a, r in zip(("y", "dx", "dw", "db"), got, ref, strict=False):
        assert a.dtype == dtype, name
        err = _rel_err(a, r)
        assert err <= tol, f"{impl} {name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}")
def test_matches_float64_reference(impl, case):
    _check(impl, *case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c[0]}->{c[1]}")
def test_matches_float64_reference_without_bias(impl, case):
    _check(impl, *case, bias=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES[1::2], ids=lambda c: f"{c[0]}->{c[1]}")
def test_bfloat16(impl, case):
    _check(impl, *case, dtype=jnp.bfloat16, tol=1e-2)


@needs_native
@pytest.mark.parametrize("case", CASES[3:7], ids=lambda c: f"{c[0]}->{c[1]}")
def test_native_equals_xla(case):
    x, w, b, g = _operands(1, *case, jnp.float32)
    for a, r in zip(_run("native", x, w, b, g), _run("xla", x, w, b, g), strict=True):
        assert _rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_second_order_gradients(impl):
    """grad of a function of the input gradient (kernel and bias paths), against "xla"."""
    x, w, b, g = _operands(2, (2, 5, 4, 9), 11, jnp.float32)

    def inner(x, w, b, impl):
        return jnp.sum(jnp.sin(pointwise_conv(x, w, b, impl=impl)) * g)

    def outer(w, b, impl):
        dx, dw, db = jax.grad(inner, argnums=(0, 1, 2))(x, w, b, impl)
        return jnp.sum(dx**2) + jnp.sum(jnp.cos(dw)) + jnp.sum(db**3)

    got = jax.jit(jax.grad(outer, argnums=(0, 1)), static_argnums=2)(w, b, impl)
    ref = jax.jit(jax.grad(outer, argnums=(0, 1)), static_argnums=2)(w, b, "xla")
    for a, r in zip(got, ref, strict=True):
        assert _rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    x, w, b, g = _operands(3, (0, 4, 4, 8), 6, jnp.float32)
    y, dx, dw, db = _run(impl, x, w, b, g)
    assert y.shape == (0, 4, 4, 6) and dx.shape == x.shape
    np.testing.assert_array_equal(np.asarray(dw), 0.0)
    np.testing.assert_array_equal(np.asarray(db), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_call_without_jit(impl):
    x, w, b, _ = _operands(4, (2, 6, 5, 12), 20, jnp.float32)
    ref = _reference(x, w, b, jnp.zeros((2, 6, 5, 20)))[0]
    assert _rel_err(pointwise_conv(x, w, b, impl=impl), ref) <= 1e-5


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_every_instruction_set(isa):
    with native_isa(isa):
        assert native.isa() == isa
        for case in (CASES[1], CASES[5], CASES[7], CASES[8]):
            _check("native", *case)
        _check("native", *CASES[2], dtype=jnp.bfloat16, tol=1e-2)


@needs_native
def test_native_weight_gradient_is_deterministic():
    x, w, b, g = _operands(5, (8, 32, 32, 16), 24, jnp.float32)
    first = [np.asarray(v) for v in _run("native", x, w, b, g)[2:]]
    for _ in range(3):
        for a, r in zip(_run("native", x, w, b, g)[2:], first, strict=True):
            np.testing.assert_array_equal(np.asarray(a), r)


@needs_native
def test_native_under_vmap():
    x, w, b, _ = _operands(6, (3, 2, 5, 5, 7), 9, jnp.float32)
    got = jax.vmap(lambda xi: pointwise_conv(xi, w, b, impl="native"))(x)
    ref = jax.vmap(lambda xi: pointwise_conv(xi, w, b, impl="xla"))(x)
    assert _rel_err(got, ref) <= 1e-5


def test_auto_selection():
    big = jnp.zeros((1, NATIVE_MIN_ROWS, 8))
    small = jnp.zeros((1, NATIVE_MIN_ROWS - 1, 8))
    w = jnp.zeros((8, 4))
    native_ok = native.available("pointwise") and jax.default_backend() == "cpu"
    assert select_pointwise_impl(big, w) == ("native" if native_ok else "xla")
    assert select_pointwise_impl(small, w) == "xla"
    # float16 and mixed dtypes stay on XLA's GEMM.
    assert select_pointwise_impl(big.astype(jnp.float16), w.astype(jnp.float16)) == "xla"
    assert select_pointwise_impl(big, w.astype(jnp.bfloat16)) == "xla"
    assert select_pointwise_impl(big, w, jnp.zeros(4, jnp.bfloat16)) == "xla"


def test_argument_errors():
    x, w = jnp.zeros((2, 3, 5)), jnp.zeros((5, 4))
    with pytest.raises(ValueError, match="impl must be"):
        pointwise_conv(x, w, impl="eigen")
    with pytest.raises(ValueError, match="kernel must be"):
        pointwise_conv(x, jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="bias must have shape"):
        pointwise_conv(x, w, jnp.zeros(5))
    with pytest.raises(ValueError, match="impl='native' needs"):
        pointwise_conv(x.astype(jnp.float16), w.astype(jnp.float16), impl="native")


def test_falls_back_without_native_library():
    """With the library disabled, "auto" is XLA's GEMM and "native" is refused."""
    code = (
        "import jax.numpy as jnp; from jaxdsc.ops import native, pointwise_conv\n"
        "from jaxdsc.ops.pointwise import select_pointwise_impl\n"
        "x, w = jnp.ones((1, 8192, 3)), jnp.ones((3, 2))\n"
        "assert not native.available('pointwise')\n"
        "assert float(pointwise_conv(x, w).sum()) == 8192 * 2 * 3\n"
        "try:\n    pointwise_conv(x, w, impl='native')\nexcept ValueError:\n    pass\n"
        "else:\n    raise SystemExit('native did not raise')\n"
        "print(select_pointwise_impl(x, w))\n"
    )
    env = dict(os.environ, JAXDSC_DISABLE_NATIVE="1", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "xla"


@needs_native
@pytest.mark.parametrize("fused", [True, False], ids=["fused_backward", "split_backward"])
def test_native_backward_variants(fused, monkeypatch):
    """Both native backward formulations (one pass over g, or dx and dw kernels)."""
    monkeypatch.setattr(native_pointwise, "PW_FUSED_BACKWARD", fused)
    for case in (CASES[0], CASES[5], CASES[8]):
        _check("native", *case)
        _check("native", *case, bias=False)
    _check("native", *CASES[7], dtype=jnp.bfloat16, tol=1e-2)
    test_second_order_gradients("native")
