"""Implementation choice for ops with an ``"xla"`` reference and a ``"native"`` CPU kernel."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def native_or_xla(
    impl: str,
    names: Sequence[str],
    *,
    supported: Callable[[], bool],
    large: bool,
    requirement: Callable[[], str],
) -> str:
    """Resolve ``impl`` (``"auto"`` or one of ``names``) to ``"xla"`` or ``"native"``.

    ``"native"`` is checked with ``supported()`` and refused with a ``ValueError``
    carrying ``requirement()``; ``"auto"`` takes it when the call is ``large``
    enough for the kernel to win and it is supported, else ``"xla"``.
    """
    if impl == "xla":
        return "xla"
    if impl == "native":
        if not supported():
            raise ValueError(requirement())
        return "native"
    if impl != "auto":
        raise ValueError(f"impl must be 'auto' or one of {tuple(names)}, got {impl!r}")
    return "native" if large and supported() else "xla"
