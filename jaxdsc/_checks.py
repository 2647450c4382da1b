"""Argument validation shared by the JAX modules and their PyTorch twins.

Pure Python (no JAX, no PyTorch), so both frameworks raise the same errors
with the same messages. Every message names the argument, the value received
and what was expected.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

DEFAULT_RANK = 2
"""Spatial rank used when ``kernel_size`` is a bare int."""


def is_int(value: object) -> bool:
    """True for ints and integer scalars, False for bools (a common slip)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise if it is not an int >= ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def int_tuple(name: str, value: object, rank: int, *, minimum: int = 1) -> tuple[int, ...]:
    """Broadcast an int to ``rank`` entries, or check a sequence has ``rank`` ints >= minimum."""
    if is_int(value):
        return (positive_int(name, value, minimum=minimum),) * rank
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be an int or a tuple of {rank} ints, got {value!r}")
    if len(value) != rank:
        raise ValueError(
            f"{name} must have {rank} entries (one per spatial dimension), "
            f"got {len(value)}: {tuple(value)!r}"
        )
    return tuple(positive_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value))


def kernel_rank(kernel_size: object) -> int:
    """Spatial rank implied by ``kernel_size``: its length, or 2 for a bare int."""
    if is_int(kernel_size):
        return DEFAULT_RANK
    if isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
        if not 1 <= len(kernel_size) <= 3:
            raise ValueError(
                f"kernel_size must have 1, 2 or 3 entries (1-D, 2-D or 3-D conv), got {tuple(kernel_size)!r}"
            )
        return len(kernel_size)
    raise TypeError(f"kernel_size must be an int or a tuple of ints, got {kernel_size!r}")


def spatial_args(
    kernel_size: object, strides: object, dilation: object, *, names: tuple[str, str, str]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Normalise (kernel_size, strides, dilation) to tuples of one common rank.

    The rank is ``len(kernel_size)`` when it is a tuple, else 2; bare ints for
    strides and dilation are broadcast to that rank. ``names`` are the argument
    names used in errors (they differ between the JAX and PyTorch spellings).
    """
    rank = kernel_rank(kernel_size)
    k = int_tuple(names[0], kernel_size, rank)
    s = int_tuple(names[1], strides, rank)
    d = int_tuple(names[2], dilation, rank)
    return k, s, d


def choice(name: str, value: object, options: Sequence[object]) -> object:
    """Check that ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)!r}, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def number(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> float:
    """A real number in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    below = v <= low if low_open else v < low
    if below or v > high or v != v:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return v


def input_layout(
    shape: Sequence[int],
    *,
    rank: int,
    channels: int,
    channels_last: bool,
    name: str = "x",
) -> None:
    """Check an input's rank and channel count, with a hint for a transposed layout."""
    expected_ndim = rank + 2
    spatial = "DHW"[3 - rank :] if rank <= 3 else "S" * rank
    layout = f"N{spatial}C" if channels_last else f"NC{spatial}"
    if len(shape) != expected_ndim:
        raise ValueError(
            f"{name} must have rank {expected_ndim} ({layout}) for a {rank}-D layer, "
            f"got shape {tuple(shape)}"
        )
    got = shape[-1] if channels_last else shape[1]
    if got != channels:
        other = shape[1] if channels_last else shape[-1]
        hint = ""
        if other == channels:
            wrong = f"NC{spatial}" if channels_last else f"N{spatial}C"
            hint = f"; it looks like {wrong} input, this layer expects {layout}"
        axis = "last" if channels_last else "second"
        raise ValueError(
            f"{name} must have {channels} channels on its {axis} axis ({layout}), "
            f"got shape {tuple(shape)}{hint}"
        )
    if any(n <= 0 for n in shape):
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(shape)}")
