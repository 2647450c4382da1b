"""Per-platform kernel choice inside the program, and jax.export (issue 20).

``impl="auto"`` is a ``lax.platform_dependent`` choice: the CPU branch may
call the native FFI kernels, every other platform gets the portable XLA path.
Checked on a small DSCNet (stem, separable blocks, BatchNorm): the CPU
program equals the ``impl_policy("xla")`` program (forward and gradients),
a program lowered for CUDA (possible without a GPU) holds no ``jaxdsc_*``
custom call, and ``jax.export`` works where no native call is in the
program and otherwise fails naming the custom-call targets (or works with
those checks disabled, for use with the same build).

Tolerance 2e-5 relative to the largest reference magnitude: float32, the
native kernels and XLA sum in different orders through five layers and two
BatchNorms (observed below 2e-6).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from jaxdsc.models import DSCNet
from jaxdsc.ops import impl_policy, native

TOL = 2e-5
HAS_NATIVE = native.available()


def native_calls(text: str) -> set[str]:
    """The ``jaxdsc_*`` custom-call targets in StableHLO or HLO text."""
    return set(re.findall(r"custom_call @(jaxdsc_\w+)", text)) | set(
        re.findall(r'custom_call_target="(jaxdsc_\w+)"', text))


def _model(train: bool, impl: str = "auto"):
    m = DSCNet(width=8, depth=1, impl=impl, rngs=nnx.Rngs(0))
    m.train() if train else m.eval()
    graph, params, rest = nnx.split(m, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 32, 32, 3)), jnp.float32)
    return graph, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), x


def _loss_and_grad(graph):
    def loss(params, rest, x):
        return jnp.mean(nnx.merge(graph, params, rest)(x) ** 2)

    return jax.value_and_grad(loss)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _flat(tree) -> np.ndarray:
    """All leaves as one vector: some gradients are ~0 in exact arithmetic (the last
    BatchNorm's scale before the average pool), so they are compared on the scale of all."""
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def test_cpu_program_equals_xla_and_uses_native():
    graph, params, rest, x = _model(train=True)
    f = jax.jit(_loss_and_grad(graph))
    assert bool(native_calls(f.lower(params, rest, x).as_text())) == HAS_NATIVE
    got = f(params, rest, x)
    with impl_policy("xla"):
        assert not native_calls(f.lower(params, rest, x).as_text())
        ref = f(params, rest, x)
    assert _rel(got[0], ref[0]) <= TOL
    assert _rel(_flat(got[1]), _flat(ref[1])) <= TOL


def test_lowering_for_cuda_has_no_native_call():
    graph, params, rest, x = _model(train=True)
    traced = jax.jit(_loss_and_grad(graph)).trace(params, rest, x)
    assert not native_calls(traced.lower(lowering_platforms=("cuda",)).as_text())
    assert bool(native_calls(traced.lower(lowering_platforms=("cpu",)).as_text())) == HAS_NATIVE


def test_export():
    graph, params, rest, x = _model(train=False)
    f = jax.jit(lambda params, rest, x: nnx.merge(graph, params, rest)(x))
    want = f(params, rest, x)
    # For GPU/TPU only: the portable branch, no native call.
    exp = export.export(f, platforms=("cuda",))(params, rest, x)
    assert not native_calls(exp.mlir_module())
    # Portable everywhere, CPU included: the XLA policy.
    with impl_policy("xla"):
        exp = export.export(f, platforms=("cpu", "cuda"))(params, rest, x)
    assert not native_calls(exp.mlir_module())
    assert _rel(exp.call(params, rest, x), want) <= TOL
    if not HAS_NATIVE:
        return
    # The CPU program holds native FFI calls: JAX refuses to serialise them, naming them.
    with pytest.raises(ValueError, match=r"(?s)custom calls whose targets have no compatibility.*jaxdsc_"):
        export.export(f, platforms=("cpu",))(params, rest, x)
    # ... unless the caller accepts them (valid with this same build of the library).
    targets = native_calls(f.lower(params, rest, x).as_text())
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in sorted(targets)]
    exp = export.export(f, platforms=("cpu",), disabled_checks=checks)(params, rest, x)
    assert native_calls(exp.mlir_module()) == targets
    assert _rel(exp.call(params, rest, x), want) <= TOL
