"""Forward-mode AD on every path (issue 20): ``jax.jvp``, ``jax.linearize``, Hessian-vector products.

Each op is differentiated five ways: ``jax.jvp``, ``jax.linearize``, ``jax.grad``
of a nonlinear loss ``sum(sin(f) * c)``, forward-over-reverse (``jax.jvp`` of
that gradient: a Hessian-vector product) and reverse-over-forward (``jax.grad``
of the JVP). The results must equal the same derivatives of the reference:
the ``"xla"`` path for the convolutions (``lax.conv`` / ``dot_general``,
differentiated by JAX itself), and JAX's autodiff of the plain formula for
batch norm. Also checked: the same under ``jax.vmap`` (the tangent maps'
batching rule), and, from the lowered program, that plain reverse mode still
runs the fused backward kernel and that zero tangents never reach a kernel.

Tolerance: ``RTOL32`` (1e-5 relative to max |reference|; see conftest.py).
Each derivative is a sum of a few hundred float32 products taken in another
order than XLA's; observed errors are below 1e-6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RTOL32, assert_close

from jaxdsc.ops import IMPLS, depthwise_conv, native, pointwise_conv
from jaxdsc.ops.batchnorm import batch_norm_act_train

NATIVE = native.available()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {native.unavailable_reason()}")


def _arrays(seed: int, *shapes: tuple[int, ...]) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def derivatives(f, primals, tangents, seed: int = 7) -> dict[str, list[jax.Array]]:
    """jvp, linearize, grad, forward-over-reverse and reverse-over-forward of ``f`` (jitted)."""
    n = len(primals)
    outs = jax.eval_shape(lambda *a: _tuple(f(*a)), *primals)
    cots = _arrays(seed, *(o.shape for o in outs))

    def loss(*a):
        return sum(jnp.sum(jnp.sin(y) * c) for y, c in zip(_tuple(f(*a)), cots, strict=True))

    grad = jax.grad(loss, argnums=tuple(range(n)))

    @jax.jit
    def run(primals, tangents):
        jvp = _tuple(jax.jvp(f, primals, tangents)[1])
        _, lin = jax.linearize(f, *primals)
        hvp = jax.jvp(grad, primals, tangents)[1]
        rof = jax.grad(lambda *a: sum(jnp.sum(jnp.sin(t)) for t in _tuple(jax.jvp(f, a, tangents)[1])),
                       argnums=tuple(range(n)))(*primals)
        return {"jvp": jvp, "linearize": _tuple(lin(*tangents)), "grad": grad(*primals),
                "hvp": hvp, "grad of jvp": rof}

    return run(tuple(primals), tuple(tangents))


def assert_same_derivatives(got: dict, ref: dict) -> None:
    for kind in ref:
        for i, (g, r) in enumerate(zip(got[kind], ref[kind], strict=True)):
            assert_close(g, r, RTOL32, f"{kind}[{i}]")


# (x shape, kernel shape, strides, dilation, padding): stride 1 runs the fused backward.
DW_CASES = [
    ((2, 9, 8, 3), (3, 3, 1, 6), (1, 1), (1, 2), ((1, 1), (2, 2))),
    ((2, 11, 10, 4), (3, 2, 1, 4), (2, 1), (2, 1), ((2, 1), (0, 1))),
    ((3, 17, 5), (5, 1, 5), (1,), (3,), ((6, 6),)),
]
DW_IMPLS = [i for i in sorted(IMPLS) if i != "xla"]


@pytest.mark.parametrize("impl", DW_IMPLS)
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_depthwise(impl, case):
    xs, ws, strides, dil, pads = case
    if impl == "native" and not NATIVE:
        pytest.skip("native kernels unavailable")
    x, w, dx, dw = _arrays(0, xs, ws, xs, ws)

    def conv(impl):
        return lambda x, w: depthwise_conv(x, w, strides=strides, padding=pads, dilation=dil, impl=impl)

    assert_same_derivatives(derivatives(conv(impl), (x, w), (dx, dw)),
                            derivatives(conv("xla"), (x, w), (dx, dw)))


@needs_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_pointwise_native(bias, fused, monkeypatch):
    from jaxdsc.ops import native_pointwise

    monkeypatch.setattr(native_pointwise, "PW_FUSED_BACKWARD", fused)
    x, w, b, dx, dw, db = _arrays(1, (3, 5, 7), (7, 9), (9,), (3, 5, 7), (7, 9), (9,))
    primals, tangents = ((x, w, b), (dx, dw, db)) if bias else ((x, w), (dx, dw))

    def pw(impl):
        return lambda *a: pointwise_conv(*a, impl=impl)

    assert_same_derivatives(derivatives(pw("native"), primals, tangents),
                            derivatives(pw("xla"), primals, tangents))


@needs_native
def test_fused_separable():
    from jaxdsc.ops import separable

    if not separable.fused_available():
        pytest.skip("native fused separable forward not built")
    # 4 * 32 * 32 = 4096 rows: "auto" picks the native GEMM, so the forward fuses.
    shapes = ((4, 32, 32, 8), (3, 3, 1, 8), (8, 16), (8,), (16,))
    primals, tangents = _arrays(2, *shapes), _arrays(3, *shapes)
    kw = {"strides": (1, 1), "padding": ((2, 2), (2, 2)), "dilation": (2, 2)}
    fused = functools.partial(separable.separable_conv, **kw)
    assert separable.SEP_TARGET in jax.jit(fused).lower(*primals).as_text()

    def reference(x, wd, wp, bd, bp):
        h = depthwise_conv(x, wd, impl="xla", **kw) + bd
        return pointwise_conv(h, wp, bp, impl="xla")

    assert_same_derivatives(derivatives(fused, primals, tangents), derivatives(reference, primals, tangents))


def _bn_formula(x, scale, bias, relu):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    y = (x - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias
    return (jax.nn.relu(y) if relu else y), mean, var


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("impl", ["xla", "native"])
def test_batch_norm(impl, relu):
    if impl == "native" and not native.available("batchnorm"):
        pytest.skip("native batch norm unavailable")
    shapes = ((6, 5, 4, 11), (11,), (11,))
    primals, tangents = _arrays(4, *shapes), _arrays(5, *shapes)

    def bn(x, scale, bias):
        return batch_norm_act_train(x, scale, bias, 1e-3, relu=relu, impl=impl)

    assert_same_derivatives(derivatives(bn, primals, tangents),
                            derivatives(lambda *a: _bn_formula(*a, relu), primals, tangents))


@pytest.mark.parametrize("impl", DW_IMPLS)
def test_under_vmap(impl):
    """Per-example jvp and Hessian-vector products (the tangent maps' batching rule)."""
    if impl == "native" and not NATIVE:
        pytest.skip("native kernels unavailable")
    xs, ws, strides, dil, pads = DW_CASES[0]
    x, w, dx = _arrays(6, xs, ws, xs)

    def per_example(impl):
        def conv(xi, w):
            return depthwise_conv(xi[None], w, strides=strides, padding=pads, dilation=dil, impl=impl)[0]

        def grad(xi, w):
            return jax.grad(lambda xi, w: jnp.sum(jnp.sin(conv(xi, w))), argnums=(0, 1))(xi, w)

        @jax.jit
        def run(x, w, dx):
            jvp = jax.vmap(lambda xi, ti: jax.jvp(lambda a: conv(a, w), (xi,), (ti,))[1])(x, dx)
            hvp = jax.vmap(lambda xi, ti: jax.jvp(grad, (xi, w), (ti, jnp.zeros_like(w)))[1])(x, dx)
            return {"jvp": (jvp,), "hvp": hvp}

        return run(x, w, dx)

    assert_same_derivatives(per_example(impl), per_example("xla"))


def _targets(f, *args) -> list[str]:
    text = jax.jit(f).lower(*args).as_text()
    return sorted(line.split("@")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line)


@needs_native
def test_reverse_mode_keeps_fused_backward_and_skips_zero_tangents():
    xs, ws, strides, dil, pads = DW_CASES[0]
    x, w = _arrays(8, xs, ws)

    def loss(x, w):
        return jnp.sum(jnp.sin(depthwise_conv(x, w, strides=strides, padding=pads, dilation=dil, impl="native")))

    assert _targets(jax.grad(loss, argnums=(0, 1)), x, w) == ["jaxdsc_dw_forward", "jaxdsc_dw_grad_both"]
    # The data's gradient is not asked for: no input-gradient kernel runs.
    assert _targets(jax.grad(loss, argnums=1), x, w) == ["jaxdsc_dw_forward", "jaxdsc_dw_grad_kernel"]
    # A tangent along x only: one forward for the value, one for the tangent.
    jvp_x = lambda x, w: jax.jvp(lambda a: loss(a, w), (x,), (x,))  # noqa: E731
    assert _targets(jvp_x, x, w) == ["jaxdsc_dw_forward", "jaxdsc_dw_forward"]
