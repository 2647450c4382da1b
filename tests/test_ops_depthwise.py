"""Every depthwise implementation against the ``"xla"`` reference (issue 5).

Forward, input gradient and weight gradient (through ``jax.vjp``) under
``jax.jit``, over a fixed grid and a small hypothesis sweep, in float32 and
bfloat16; second-order gradients; ``supports``/``"auto"`` selection and
argument errors. Tolerances are relative to the largest reference magnitude:

* float32: 1e-5. The paths sum the same products in a different order
  (k**rank terms per output, N*H*W per weight-gradient entry); observed
  errors are below 5e-7.
* bfloat16: 1e-2. Inputs are bfloat16 and every path accumulates in
  float32, so the outputs differ by at most about one bfloat16 rounding
  (2**-8 = 3.9e-3 relative) of values that already differ in the last
  float32 bits.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxdsc.ops import (
    IMPLS,
    depthwise_conv,
    native,
    native_depthwise,
    pointwise_conv,
    select_impl,
    shift,
)
from jaxdsc.ops.depthwise import DepthwiseCall, make_call

FAST = sorted(name for name in IMPLS if name != "xla")
needs_native = pytest.mark.skipif(
    not native.available("depthwise"), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)


def _conv(impl: str, strides, padding, dilation):
    return lambda x, w: depthwise_conv(
        x, w, strides=strides, padding=padding, dilation=dilation, impl=impl
    )


def _all_outputs(impl, x, w, g, strides, padding, dilation):
    """(y, dx, dw) of one implementation, under jit."""

    def run(x, w, g):
        y, vjp = jax.vjp(_conv(impl, strides, padding, dilation), x, w)
        return (y, *vjp(g))

    return jax.jit(run)(x, w, g)


def _rel_err(got: jax.Array, ref: jax.Array) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape
    return float(
        np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30)
    )


def _case(rng, n, spatial, c, m, k, dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal((n, *spatial, c)), dtype)
    w = jnp.asarray(rng.standard_normal((*k, 1, c * m)), dtype)
    return x, w


def _check(
    impl, n, spatial, c, m, k, strides, dilation, padding, *, seed=0, dtype=jnp.float32, tol=1e-5
):
    rng = np.random.default_rng(seed)
    x, w = _case(rng, n, spatial, c, m, k, dtype)
    y_ref = _conv("xla", strides, padding, dilation)(x, w)
    g = jnp.asarray(rng.standard_normal(y_ref.shape), dtype)
    ref = _all_outputs("xla", x, w, g, strides, padding, dilation)
    got = _all_outputs(impl, x, w, g, strides, padding, dilation)
    for name, a, b in zip(("y", "dx", "dw"), got, ref, strict=True):
        assert a.dtype == b.dtype == dtype, name
        err = _rel_err(a, b)
        assert err <= tol, f"{impl} {name}: relative error {err:.2e} > {tol:.0e}"


# (n, spatial, c, m, k, strides, dilation, padding)
GRID = [
    (2, (9, 8), 5, 1, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),  # "SAME", odd/even sizes
    (2, (9, 8), 16, 1, (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2))),  # dilated, full SIMD block
    (3, (11, 10), 20, 1, (5, 3), (2, 3), (1, 2), ((0, 3), (2, 1))),  # strides, asymmetric pads
    (2, (7, 9), 3, 3, (3, 2), (2, 1), (3, 1), ((4, 0), (0, 1))),  # depth multiplier 3
    (1, (1, 1), 4, 2, (5, 5), (3, 3), (4, 4), ((8, 8), (8, 8))),  # 1x1 input, huge padding
    (2, (13,), 33, 1, (7,), (1,), (2,), ((6, 6),)),  # 1-D, channel tail
    (2, (6,), 2, 2, (1,), (3,), (1,), ((2, 0),)),  # 1-D, 1-tap kernel, stride > kernel
    (2, (5, 4, 6), 8, 1, (2, 3, 3), (1, 2, 2), (2, 1, 2), ((1, 0), (0, 2), (2, 2))),  # 3-D
    (5, (64, 64), 16, 1, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),  # shift: chunked dw, N padded
    (2, (12, 12), 64, 1, (3, 3), (2, 2), (1, 1), ((0, 1), (0, 1))),  # stride-2 "SAME"
    (2, (12, 14), 48, 1, (5, 5), (1, 1), (2, 2), ((4, 4), (4, 4))),  # k5: input-sharing blocks
    (2, (9, 11), 20, 1, (3, 7), (1, 1), (1, 1), ((1, 2), (3, 3))),  # k7 wide, channel tail
    # k3 d4 on 16-wide rows: border runs of 4 pixels sharing their valid taps,
    # 4-vector blocks plus a channel tail (72 = 4 * 16 + 8).
    (2, (10, 16), 72, 1, (3, 3), (1, 1), (4, 4), ((4, 4), (3, 5))),
    (1, (4, 3), 40, 1, (3, 3), (1, 1), (4, 4), ((5, 5), (5, 5))),  # outputs with no valid tap
]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("case", GRID, ids=[f"grid{i}" for i in range(len(GRID))])
def test_matches_xla_float32(impl, case):
    _check(impl, *case)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("case", [GRID[1], GRID[3], GRID[5]], ids=["dilated", "multiplier", "1d"])
def test_matches_xla_bfloat16(impl, case):
    _check(impl, *case, dtype=jnp.bfloat16, tol=1e-2)


@st.composite
def _geometry(draw):
    rank = draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 7 if rank < 3 else 3)) for _ in range(rank))
    d = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    s = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    spatial, pads = [], []
    for ki, di in zip(k, d, strict=True):
        n = draw(st.integers(1, 12))
        lo, hi = draw(st.integers(0, 6)), draw(st.integers(0, 6))
        # Grow the high padding until at least one output exists.
        hi = max(hi, di * (ki - 1) + 1 - n - lo)
        spatial.append(n)
        pads.append((lo, hi))
    # Scalar-only widths and widths with 16-float SIMD blocks plus a tail (the
    # native kernel's 4-vector blocks, border runs and tails all by geometry).
    c = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 40, 72]))
    m = draw(st.integers(1, 3))
    n_batch = draw(st.integers(1, 3))
    return n_batch, tuple(spatial), c, m, k, s, d, tuple(pads)


@pytest.mark.parametrize("impl", FAST)
@settings(
    max_examples=24, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(geometry=_geometry())
def test_matches_xla_hypothesis(impl, geometry):
    n, spatial, c, m, k, s, d, pads = geometry
    _check(impl, n, spatial, c, m, k, s, d, pads, seed=sum(spatial) + c)


@pytest.mark.parametrize("impl", FAST)
def test_second_order_gradients(impl):
    """grad of grad (dx of dx, dw of dx, dx of dw) equals the reference's."""
    rng = np.random.default_rng(1)
    x, w = _case(rng, 2, (6, 7), 4, 2, (3, 3))
    v = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def hvp(impl):
        conv = _conv(impl, (2, 1), ((1, 1), (2, 0)), (1, 2))

        def loss(x, w):
            return jnp.sum(jnp.sin(conv(x, w)))

        def inner(x, w):
            gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
            return jnp.sum(gx * v) + jnp.sum(gw**2)

        return jax.jit(jax.grad(inner, argnums=(0, 1)))(x, w)

    for a, b in zip(hvp(impl), hvp("xla"), strict=True):
        assert _rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("case", [GRID[1], GRID[2]], ids=["stride1", "stride2"])
def test_standalone_backward_kernels(impl, case):
    """grad_input / grad_kernel on their own (the VJP may use a fused kernel instead)."""
    n, spatial, c, m, k, strides, dilation, padding = case
    rng = np.random.default_rng(5)
    x, w = _case(rng, n, spatial, c, m, k)
    y, vjp = jax.vjp(_conv("xla", strides, padding, dilation), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx_ref, dw_ref = vjp(g)
    call = make_call(x, w, strides=strides, padding=padding, dilation=dilation)
    fam = {"shift": shift, "native": native_depthwise}[impl].family(call)
    assert _rel_err(jax.jit(fam.grad_input)(g, w), dx_ref) <= 1e-5
    assert _rel_err(jax.jit(fam.grad_kernel)(x, g), dw_ref) <= 1e-5


@pytest.mark.parametrize("impl", FAST)
def test_eager_call_without_jit(impl):
    rng = np.random.default_rng(2)
    x, w = _case(rng, 1, (5, 5), 3, 1, (3, 3))
    args = dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
    got = depthwise_conv(x, w, impl=impl, **args)
    ref = depthwise_conv(x, w, impl="xla", **args)
    assert _rel_err(got, ref) <= 1e-5


def _call(**overrides) -> DepthwiseCall:
    base = dict(
        rank=2,
        channels=4,
        depth_multiplier=1,
        kernel_size=(3, 3),
        strides=(1, 1),
        dilation=(1, 1),
        padding=((1, 1), (1, 1)),
        dtype=jnp.dtype(jnp.float32),
        backend="cpu",
        spatial=(8, 8),
        batch=2,
    )
    return DepthwiseCall(**{**base, **overrides})


def test_auto_selection():
    fast = "native" if native.available("depthwise") else "shift"
    assert select_impl(_call(), "auto") == (fast if jax.default_backend() == "cpu" else "xla")
    assert select_impl(_call(), "auto") in IMPLS
    assert select_impl(_call(backend="gpu"), "auto") == "xla"
    assert select_impl(_call(backend="tpu"), "auto") == "xla"
    # float16: native declines, the pure-JAX path takes it.
    assert select_impl(_call(dtype=jnp.dtype(jnp.float16)), "auto") == "shift"
    # Empty output: only the reference handles it.
    assert select_impl(_call(spatial=(1, 1), padding=((0, 0), (0, 0))), "auto") == "xla"


def test_supports_declines():
    shift = IMPLS["shift"]
    assert shift.supports(_call())
    assert not shift.supports(_call(dtype=jnp.dtype(jnp.int32)))
    assert not shift.supports(_call(spatial=(1, 1), padding=((0, 0), (0, 0))))
    if "native" in IMPLS:
        nat = IMPLS["native"]
        assert nat.supports(_call()) == native.available("depthwise")
        assert nat.supports(_call(dtype=jnp.dtype(jnp.bfloat16))) == native.available("depthwise")
        assert not nat.supports(_call(dtype=jnp.dtype(jnp.float16)))
        assert not nat.supports(_call(backend="gpu"))
        assert not nat.supports(_call(spatial=(2, 2), padding=((0, 0), (0, 0))))


def test_unknown_impl_name():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2))
    with pytest.raises(ValueError, match=r"impl must be 'auto' or one of .*'xla'.*got 'fastest'"):
        depthwise_conv(
            x, w, strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), impl="fastest"
        )


def test_declined_impl_name_raises():
    x, w = jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 1, 2))
    with pytest.raises(ValueError, match="does not support this call"):
        depthwise_conv(
            x, w, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), impl="shift"
        )


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "kwargs", "error", "match"),
    [
        ((1, 4, 4, 2), (3, 3, 1, 2), dict(strides=(1,)), ValueError, "strides must be 2 ints"),
        (
            (1, 4, 4, 2),
            (3, 3, 1, 2),
            dict(dilation=(0, 1)),
            ValueError,
            "dilation must be 2 ints >= 1",
        ),
        ((1, 4, 4, 2), (3, 3, 1, 2), dict(padding=((1, -1), (1, 1))), ValueError, "non-negative"),
        ((1, 4, 4, 2), (3, 3, 2, 2), {}, ValueError, r"kernel must have shape \(\*kernel_size, 1"),
        ((1, 4, 4, 2), (3, 3, 1, 3), {}, ValueError, "multiple of the 2 input channels"),
        ((4, 2), (3, 1, 2), {}, ValueError, "x must have rank 3, 4 or 5"),
    ],
)
def test_argument_errors(x_shape, w_shape, kwargs, error, match):
    args = dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1)) | kwargs
    with pytest.raises(error, match=match):
        make_call(jnp.ones(x_shape), jnp.ones(w_shape), **args)


def test_dtype_mismatch_is_a_type_error():
    with pytest.raises(TypeError, match="same dtype"):
        depthwise_conv(
            jnp.ones((1, 4, 4, 2), jnp.bfloat16),
            jnp.ones((3, 3, 1, 2), jnp.float32),
            strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dilation=(1, 1),
        )


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_every_instruction_set(isa):
    with native_isa(isa):
        assert native.isa() == isa
        for case in (GRID[2], GRID[3], GRID[9], GRID[10], GRID[12]):
            _check("native", *case)
        _check("native", *GRID[1], dtype=jnp.bfloat16, tol=1e-2)


@needs_native
def test_native_set_isa_rejects_unknown():
    with pytest.raises(ValueError, match="isa must be one of"):
        native.set_isa("sse9")


@needs_native
def test_native_weight_gradient_is_deterministic():
    rng = np.random.default_rng(3)
    x, w = _case(rng, 16, (16, 16), 32, 1, (3, 3))
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    args = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    first = np.asarray(_all_outputs("native", x, w, g, *args)[2])
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(_all_outputs("native", x, w, g, *args)[2]), first)


@needs_native
def test_native_under_vmap():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
    args = dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
    got = jax.vmap(lambda xi: depthwise_conv(xi, w, impl="native", **args))(x)
    ref = jax.vmap(lambda xi: depthwise_conv(xi, w, impl="xla", **args))(x)
    assert _rel_err(got, ref) <= 1e-5


def test_falls_back_without_native_library():
    """With the library disabled, jaxdsc imports and "auto" runs the pure-JAX path."""
    code = (
        "import jax.numpy as jnp; from jaxdsc.ops import IMPLS, select_impl, native\n"
        "from jaxdsc.ops.depthwise import make_call\n"
        "x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2))\n"
        "c = make_call(x, w, strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))\n"
        "assert 'native' not in IMPLS and not native.available()\n"
        "print(select_impl(c, 'auto'), native.unavailable_reason())\n"
    )
    env = dict(os.environ, JAXDSC_DISABLE_NATIVE="1", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "shift"
    assert "JAXDSC_DISABLE_NATIVE" in out.stdout


@pytest.mark.parametrize(
    "shape", [(3, 7, 5), (2, 4, 3, 5), (2, 3, 2, 4, 5)], ids=["1d", "2d", "3d"]
)
def test_pointwise_matches_einsum_with_gradients(shape):
    """The pointwise conv (2-D matmul view) against an einsum, forward and VJP."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((shape[-1], 6)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(6), jnp.float32)

    def ref(x, w, b):
        return jnp.einsum("...c,co->...o", x, w, precision="highest") + b

    y, vjp = jax.vjp(pointwise_conv, x, w, b)
    y_ref, vjp_ref = jax.vjp(ref, x, w, b)
    assert y.shape == (*shape[:-1], 6)
    assert _rel_err(y, y_ref) <= 1e-5
    for a, r in zip(vjp(y), vjp_ref(y), strict=True):
        assert _rel_err(a, r) <= 1e-5
    # bfloat16 against the float32 result of the unrounded inputs: input
    # rounding (2**-9 each) is included, hence 2e-2 rather than 1e-2.
    y16 = pointwise_conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert _rel_err(y16, y_ref - b) <= 2e-2
