"""Implementation choice: one policy for every op, and a per-platform choice inside the program.

Every op (depthwise, pointwise, batch norm, dense) has an ``"xla"`` reference
and faster CPU paths; its ``impl="auto"`` is resolved in two steps:

1. the active policy (:func:`impl_policy`, ``"auto"`` unless set) maps
   ``"auto"`` to this op's implementation through :data:`IMPL_TABLE`, the same
   table that maps a module's ``impl`` (``SeparableBlock(impl="xla")``) to each
   op it runs;
2. an ``"auto"`` left after that is chosen per platform *inside* the program
   (:func:`on_platforms`): ``lax.platform_dependent`` with the CPU choice (a
   native kernel when built and the call is large enough) for the CPU branch
   and the portable choice (``"xla"``) for every other platform. Lowering keeps
   only the branch of the platform compiled for, so a CPU-only FFI call never
   lands in a GPU or TPU program and a traced function is right wherever it runs.

An explicit op name (``impl="native"``) is taken literally and not made
platform-dependent: a program with a native kernel runs on CPU only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax

OPS = ("depthwise", "pointwise", "batchnorm", "dense")

# A module's impl or a policy -> the impl of each op kind it covers.
IMPL_TABLE: dict[str, dict[str, str]] = {
    "auto": {"depthwise": "auto", "pointwise": "auto", "batchnorm": "auto", "dense": "auto"},
    "xla": {"depthwise": "xla", "pointwise": "xla", "batchnorm": "xla", "dense": "xla"},
    # pure JAX, no native kernel: the shifted-slice depthwise conv, XLA for the rest
    "shift": {"depthwise": "shift", "pointwise": "xla", "batchnorm": "xla", "dense": "xla"},
    "native": {"depthwise": "native", "pointwise": "native", "batchnorm": "native", "dense": "native"},
}
POLICIES = tuple(IMPL_TABLE)

# Part of jax.jit's cache key: a function traced under one policy is retraced under another.
_POLICY = jax.make_user_context("auto")


def impl_policy(policy: str) -> contextlib.AbstractContextManager[None]:
    """Context manager: ops with ``impl="auto"`` traced in the body use ``policy``'s choice.

    ``policy``: ``"auto"`` (each op picks, per platform), ``"xla"`` (the
    reference everywhere: no native kernel, no shifted slices, no im2col),
    ``"shift"`` (pure JAX, no native kernel) or ``"native"`` (native kernels
    everywhere, CPU only). Ops and modules given an explicit implementation
    keep it. The policy is read at trace time and is part of ``jax.jit``'s
    cache key.
    """
    if policy not in IMPL_TABLE:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return _POLICY(policy)


def current_policy() -> str:
    """The active :func:`impl_policy` (``"auto"`` outside any)."""
    return _POLICY.value or "auto"


def op_impl(op: str, impl: str) -> str:
    """A module's ``impl`` (a key of :data:`IMPL_TABLE` or an op-specific name) for op kind ``op``."""
    return IMPL_TABLE[impl][op] if impl in IMPL_TABLE else impl


def with_policy(op: str, impl: str) -> str:
    """``impl`` after the active policy: ``"auto"`` becomes the policy's choice for ``op``."""
    return IMPL_TABLE[current_policy()][op] if impl == "auto" else impl


def check_impl(op: str, impl: str, names: Sequence[str]) -> str:
    """Validate a module's ``impl``: a key of :data:`IMPL_TABLE` or one of the op's ``names``."""
    if impl not in IMPL_TABLE and impl not in names:
        choices = sorted({*IMPL_TABLE, *names} - {"auto"})
        raise ValueError(f"impl must be 'auto' or one of {choices} (the {op} op), got {impl!r}")
    return impl


def on_platforms(args: Sequence[Any], choose: Callable[[str], str],
                 run: Callable[[str, str], Callable[..., Any]]) -> Any:
    """``run(name, platform)(*args)`` with ``name = choose(platform)`` picked per platform.

    ``platform`` is ``"cpu"`` or ``"default"`` (any other). One plain call when
    both choose the same; else ``lax.platform_dependent``.
    """
    cpu, other = choose("cpu"), choose("default")
    if cpu == other:
        return run(cpu, "cpu")(*args)
    return lax.platform_dependent(*args, cpu=run(cpu, "cpu"), default=run(other, "default"))


def native_or_xla(
    impl: str,
    names: Sequence[str],
    *,
    supported: Callable[[], bool],
    large: bool,
    requirement: Callable[[], str],
    platform: str = "cpu",
) -> str:
    """Resolve ``impl`` (``"auto"`` or one of ``names``) to ``"xla"`` or ``"native"`` on ``platform``.

    ``"native"`` is checked with ``supported()`` and refused with a ``ValueError``
    carrying ``requirement()``; ``"auto"`` takes it on CPU when the call is
    ``large`` enough for the kernel to win and it is supported, else ``"xla"``.
    """
    if impl == "xla":
        return "xla"
    if impl == "native":
        if not supported():
            raise ValueError(requirement())
        return "native"
    if impl != "auto":
        raise ValueError(f"impl must be 'auto' or one of {tuple(names)}, got {impl!r}")
    return "native" if platform == "cpu" and large and supported() else "xla"


def platform_of_default_backend() -> str:
    """``"cpu"`` or ``"default"`` for ``jax.default_backend()`` (what the ``select_*`` helpers report)."""
    return "cpu" if jax.default_backend() == "cpu" else "default"
