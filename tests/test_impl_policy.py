"""``impl`` reaches every op a module runs, and ``jaxdsc.ops.impl_policy`` (issue 20).

A module's ``impl`` is mapped by ``jaxdsc.ops.IMPL_TABLE`` to each op it runs
(depthwise, pointwise, BatchNorm, the dense stem); ``"xla"`` and ``"shift"``
leave no native custom call in the lowered program, checked on the HLO of a
train-mode forward + gradient. ``impl_policy`` does the same for ops left
``"auto"``, and is part of ``jax.jit``'s cache key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_platforms import native_calls

import jaxdsc
from jaxdsc.models import DSCNet
from jaxdsc.ops import IMPL_TABLE, current_policy, impl_policy, native

HAS_NATIVE = native.available()


def _lowered(model: nnx.Module, x: jax.Array) -> str:
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):
        return jnp.mean(nnx.merge(graph, params, rest)(x) ** 2)

    return jax.jit(jax.grad(loss)).lower(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), x).as_text()


def _abstract(cls, *args, **kwargs) -> nnx.Module:
    """``cls(*args, **kwargs)`` with abstract parameters (``nnx.eval_shape``): which kernels the lowered
    program calls depends only on shapes, dtypes and ``impl``, and ``jax.random`` would compile one
    initializer per parameter shape (most of this file's time otherwise)."""
    return nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


def _x(shape):
    return jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "shift"])
def test_separable_block_xla_and_shift_have_no_native_call(impl):
    x = _x((8, 32, 32, 16))
    assert not native_calls(_lowered(_abstract(jaxdsc.SeparableBlock, 16, 32, 3, impl=impl), x))


def test_separable_block_auto_and_native_use_every_native_kernel():
    if not HAS_NATIVE:
        pytest.skip("native library not available")
    x = _x((8, 32, 32, 16))
    for impl in ("auto", "native"):
        calls = native_calls(_lowered(_abstract(jaxdsc.SeparableBlock, 16, 32, 3, impl=impl), x))
        assert {c.split("_")[1] for c in calls} == {"dw", "pw", "bn"}, (impl, calls)


def test_dscnet_xla_has_no_native_call_and_policy_does_the_same():
    x = _x((8, 32, 32, 3))
    assert not native_calls(_lowered(_abstract(DSCNet, width=8, depth=1, impl="xla"), x))
    auto = _abstract(DSCNet, width=8, depth=1)
    assert bool(native_calls(_lowered(auto, x))) == HAS_NATIVE
    with impl_policy("xla"):
        assert current_policy() == "xla"
        assert not native_calls(_lowered(auto, x))
    assert current_policy() == "auto"


def test_module_impl_reaches_every_op():
    m = _abstract(DSCNet, width=8, depth=1, impl="xla")
    impls = {type(mod).__name__: mod.impl for _, mod in nnx.iter_graph(m)
             if isinstance(mod, nnx.Module) and hasattr(mod, "impl")}
    for name in ("Conv", "DepthwiseConv", "PointwiseConv", "BatchNorm"):
        assert impls[name] == "xla", (name, impls)
    blk = _abstract(jaxdsc.SeparableBlock, 4, 8, 3, impl="shift")
    assert (blk.depthwise.impl, blk.pointwise.impl, blk.bn_dw.impl) == ("shift", "xla", "xla")
    assert set(IMPL_TABLE) == {"auto", "xla", "shift", "native"}


def test_policy_is_in_the_jit_cache_key():
    w = _x((3, 3, 1, 64))

    @jax.jit
    def f(x):
        return jaxdsc.ops.depthwise_conv(x, w, strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))

    x = _x((2, 16, 16, 64))
    assert bool(native_calls(f.lower(x).as_text())) == HAS_NATIVE
    with impl_policy("xla"):
        assert not native_calls(f.lower(x).as_text())
        y_xla = f(x)
    np.testing.assert_allclose(f(x), y_xla, rtol=1e-5, atol=1e-5)


def test_bad_policy_and_impl_names():
    with pytest.raises(ValueError, match=r"policy must be one of .*'xla'.*got 'fast'"):
        impl_policy("fast")
    with pytest.raises(ValueError, match=r"impl must be 'auto' or one of .* \(the pointwise op\), got 'gemm'"):
        jaxdsc.PointwiseConv(4, 4, impl="gemm", rngs=nnx.Rngs(0))
