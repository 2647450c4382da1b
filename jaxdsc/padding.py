"""Padding rules, resolved in one place for both frameworks.

Every padding spec is turned into explicit ``((lo, hi), ...)`` pairs plus a
fill mode *before* any framework call; the JAX modules and their PyTorch twins
both call :func:`resolve_padding`, so they pad identically by construction.

Accepted specs (``rank`` = number of spatial dims):

======================  ==============================================================
``"SAME"``              output size ``ceil(n / s)``; odd totals put the extra on the high
                        side (XLA / TensorFlow convention). Depends on the input size.
``"SAME_LOWER"``        as ``"SAME"`` but the extra goes on the low side (ONNX).
``"VALID"``             no padding.
``"CAUSAL"``            1-D only: ``d * (k - 1)`` on the low side, output ``t`` sees inputs ``<= t``.
``"CIRCULAR"``          ``"SAME"`` amounts, filled by wrapping around (periodic signals).
``"REFLECT"``           ``"SAME"`` amounts, mirrored without repeating the edge.
``"REPLICATE"``         ``"SAME"`` amounts, filled with the edge value.
``"SYMMETRIC"``         PyTorch/timm style: ``((s - 1) + d * (k - 1)) // 2`` on both sides,
                        independent of the input size, so models ported from PyTorch keep
                        their padding.
``int p``               ``p`` zeros on both sides of every spatial dim.
``(p0, (lo1, hi1))``    per dim: an int (both sides) or an explicit ``(lo, hi)`` pair.
======================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jaxdsc._checks import is_int

PaddingLike = str | int | Sequence[int | Sequence[int]]
Pairs = tuple[tuple[int, int], ...]

PADDING_MODES = ("constant", "circular", "reflect", "replicate")
SAME_LIKE = {"SAME": "constant", "CIRCULAR": "circular", "REFLECT": "reflect", "REPLICATE": "replicate"}
PADDING_NAMES = ("SAME", "SAME_LOWER", "VALID", "CAUSAL", "CIRCULAR", "REFLECT", "REPLICATE", "SYMMETRIC")


@dataclass(frozen=True)
class Padding:
    """Resolved padding: explicit ``(lo, hi)`` per spatial dim and a fill mode."""

    pairs: Pairs
    mode: str = "constant"

    @property
    def is_zero(self) -> bool:
        return all(lo == 0 and hi == 0 for lo, hi in self.pairs)


def canonical_padding(padding: PaddingLike, rank: int, name: str = "padding") -> str | Pairs:
    """Validate a padding spec at construction time.

    Returns an upper-case name from :data:`PADDING_NAMES` or explicit pairs.
    Raises ``ValueError``/``TypeError`` naming ``name`` and the value.
    """
    if isinstance(padding, str):
        key = padding.upper()
        if key not in PADDING_NAMES:
            raise ValueError(f"{name} must be one of {list(PADDING_NAMES)}, an int or (lo, hi) pairs, got {padding!r}")
        if key == "CAUSAL" and rank != 1:
            raise ValueError(f"{name}='CAUSAL' is only defined for 1-D convolutions, got a {rank}-D kernel")
        return key
    if is_int(padding):
        if padding < 0:  # type: ignore[operator]
            raise ValueError(f"{name} must be >= 0, got {padding!r}")
        return ((int(padding), int(padding)),) * rank  # type: ignore[arg-type]
    if not isinstance(padding, Sequence):
        raise TypeError(f"{name} must be a string, an int or a sequence of (lo, hi) pairs, got {padding!r}")
    if len(padding) != rank:
        raise ValueError(f"{name} must have {rank} entries (one per spatial dimension), got {len(padding)}: {padding!r}")
    pairs = []
    for i, p in enumerate(padding):
        if is_int(p):
            p = (p, p)
        if (
            isinstance(p, str)
            or not isinstance(p, Sequence)
            or len(p) != 2
            or not all(is_int(v) for v in p)
        ):
            raise TypeError(f"{name}[{i}] must be an int or a (lo, hi) pair of ints, got {p!r}")
        if p[0] < 0 or p[1] < 0:
            raise ValueError(f"{name}[{i}] must be non-negative, got {tuple(p)!r}")
        pairs.append((int(p[0]), int(p[1])))
    return tuple(pairs)


def same_pair(n: int, k: int, s: int, d: int, *, lower: bool = False) -> tuple[int, int]:
    """XLA's SAME padding for one dim: output ``ceil(n / s)``."""
    out = -(-n // s)
    total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


def output_size(n: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    """Output length of a strided, dilated conv over a padded dim (may be <= 0)."""
    return (n + lo + hi - d * (k - 1) - 1) // s + 1


def resolve_padding(
    padding: str | Pairs,
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
) -> Padding:
    """Turn a canonical spec into explicit pairs for inputs of ``spatial_shape``.

    Also checks that the output is non-empty and that reflect/circular padding
    is smaller than the input (both frameworks require it).
    """
    dims = list(zip(spatial_shape, kernel_size, strides, dilation, strict=True))
    mode = "constant"
    if isinstance(padding, str):
        if padding == "VALID":
            pairs: Pairs = tuple((0, 0) for _ in dims)
        elif padding == "SAME_LOWER":
            pairs = tuple(same_pair(*dim, lower=True) for dim in dims)
        elif padding == "CAUSAL":
            pairs = tuple((d * (k - 1), 0) for _, k, _, d in dims)
        elif padding == "SYMMETRIC":
            pairs = tuple(((s - 1) + d * (k - 1)) // 2 for _, k, s, d in dims)
            pairs = tuple((p, p) for p in pairs)  # type: ignore[misc]
        else:
            mode = SAME_LIKE[padding]
            pairs = tuple(same_pair(*dim) for dim in dims)
    else:
        pairs = tuple(padding)
    for i, ((n, k, s, d), (lo, hi)) in enumerate(zip(dims, pairs, strict=True)):
        if output_size(n, k, s, d, lo, hi) < 1:
            raise ValueError(
                f"input spatial size {tuple(spatial_shape)} is too small: dim {i} has size {n}, "
                f"padding ({lo}, {hi}) and effective kernel size {d * (k - 1) + 1}, "
                f"which gives a negative or zero output size"
            )
        if mode == "reflect" and max(lo, hi) >= n:
            raise ValueError(
                f"REFLECT padding ({lo}, {hi}) must be smaller than the input size {n} in spatial dim {i}"
            )
        if mode == "circular" and max(lo, hi) > n:
            raise ValueError(
                f"CIRCULAR padding ({lo}, {hi}) must not exceed the input size {n} in spatial dim {i}"
            )
    return Padding(pairs=pairs, mode=mode)


def to_json(padding: str | Pairs) -> str | list[list[int]]:
    """A canonical spec as a JSON-friendly value (round-trips through :func:`canonical_padding`)."""
    return padding if isinstance(padding, str) else [list(p) for p in padding]
