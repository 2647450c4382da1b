"""The text table of a :class:`jaxdsc.summary.Summary`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxdsc.summary import Summary


def human(n: float) -> str:
    """``1234567`` -> ``"1.23M"``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _shape(shape) -> str:
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_shape(s) for s in shape)
    return "(" + ", ".join(map(str, shape)) + ")"


def format_table(s: Summary, max_depth: int | None = None) -> str:
    header = ("Layer", "Type", "Output shape", "Params", "MACs", "Regular conv: params / MACs")
    lines = []
    for r in s.rows:
        if max_depth is not None and r.depth > max_depth:
            continue
        regular = ""
        if r.regular_macs is not None:
            ratio = r.regular_macs / r.separable_macs if r.separable_macs else float("inf")
            what = "dw+pw pair " if r.type not in ("SeparableConv", "SeparableBlock") else ""
            regular = f"{what}{r.regular_params:,} / {r.regular_macs:,} ({ratio:.1f}x)"
        lines.append(("  " * r.depth + (r.path or "<root>"), r.type, _shape(r.output_shape), f"{r.params:,}",
                      "?" if r.macs is None else f"{r.macs:,}", regular))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    right = {3, 4}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(tuple("x" * w for w in widths)))
    out = [f"Input {_shape(s.input_shape)}", rule, fmt(header), rule, *map(fmt, lines), rule]
    out.append(f"Total params: {s.total_params:,} ({human(s.total_params)})")
    out.append(f"Total MACs:   {s.total_macs:,} ({human(s.total_macs)})")
    if s.regular_macs != s.total_macs:
        saved = 1 - s.total_macs / s.regular_macs
        out.append(
            f"With regular convs instead of separable: {s.regular_params:,} params "
            f"({human(s.regular_params)}), {s.regular_macs:,} MACs ({human(s.regular_macs)}); "
            f"separable saves {saved:.1%} of the MACs"
        )
    counted = sum(r.params for r in s.rows if r.depth == 0)
    if counted != s.total_params:
        out.append(f"Parameters in modules not called: {s.total_params - counted:,}")
    if s.uncounted:
        out.append("MACs not counted (parameters outside jaxdsc layers): " + ", ".join(p or "<root>" for p in s.uncounted))
    return "\n".join(out)
