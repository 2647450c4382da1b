"""Importing jaxdsc / torch_bridge starts no JAX backend and runs nothing (issue 20).

Multi-process launches must call ``jax.distributed.initialize`` before any
backend exists; the native kernels' self-checks therefore run on first use
(the first trace that would choose a native kernel), not at import. Checked in
a fresh interpreter: after the imports no backend is initialised, and
``jax.distributed.initialize`` (one process, loopback coordinator) still
succeeds; the first jitted model call afterwards runs the self-checks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from jaxdsc.ops import native

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_import_starts_no_backend_and_distributed_init_still_works():
    code = textwrap.dedent(f"""
        import jax
        from jax._src import xla_bridge
        import jaxdsc, torch_bridge, jaxdsc.ops, jaxdsc.models
        from jaxdsc.ops import native
        assert not xla_bridge.backends_are_initialized(), "a backend started at import"
        assert not xla_bridge._backends, xla_bridge._backends
        assert native._LIB is None and not native._STATUS, "native library loaded or checked at import"
        jax.distributed.initialize(coordinator_address="127.0.0.1:{_free_port()}",
                                   num_processes=1, process_id=0)
        import jax.numpy as jnp
        from flax import nnx
        x = jnp.ones((2, 8, 8, 4))
        m = jaxdsc.SeparableBlock(4, 8, 3, rngs=nnx.Rngs(0))
        y = nnx.jit(lambda m, x: m(x))(m, x)
        assert y.shape == (2, 8, 8, 8)
        print("checked:", sorted(native._STATUS))
        jax.distributed.shutdown()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    if native.library_present():
        # The first trace choosing native ran the depthwise self-check (lazily).
        assert "'depthwise'" in out.stdout, out.stdout


def _ops_imports() -> dict[str, set[str]]:
    """Module -> the jaxdsc.ops modules it imports (anywhere in the file, lazy imports too)."""
    import ast

    ops = ROOT / "jaxdsc" / "ops"
    names = {p.stem for p in ops.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in ops.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "jaxdsc.ops":
                    deps |= {a.name for a in node.names if a.name in names}
                elif node.module.startswith("jaxdsc.ops."):
                    deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("jaxdsc.ops.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_ops_dependencies_are_one_way():
    """The loader knows no kernel family; no import cycle among the ops modules (issue 14)."""
    graph = _ops_imports()
    # Only the build-record check (a leaf: no family, no other ops module).
    assert graph["native"] <= {"_build"}, graph["native"]
    assert graph["_build"] == set(), graph["_build"]
    for family in ("native_depthwise", "native_pointwise", "batchnorm", "separable"):
        assert "native" in graph[family], family  # each family registers itself with the loader
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        state[node] = 2

    for node in graph:
        visit(node, [])
