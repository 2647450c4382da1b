"""``python -m jaxdsc.summary NAME --input 1,224,224,3 [--kwargs JSON] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

from flax import nnx


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must be comma-separated ints, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input must be positive ints, got {text!r}")
    return shape


def main(argv: list[str] | None = None) -> int:
    from jaxdsc import models
    from jaxdsc.summary import summary

    parser = argparse.ArgumentParser(
        prog="python -m jaxdsc.summary",
        description="Per-layer parameters and multiply-adds of a jaxdsc.models model.",
    )
    parser.add_argument("name", help=f"a jaxdsc.models.create name, e.g. {', '.join(models.list_models()[:3])}")
    parser.add_argument("--input", type=_shape, default=(1, 224, 224, 3),
                        help="input shape NHWC, comma-separated (default 1,224,224,3)")
    parser.add_argument("--kwargs", type=json.loads, default={},
                        help='constructor keyword arguments as JSON, e.g. \'{"num_classes": 21}\'')
    parser.add_argument("--depth", type=int, default=None,
                        help="show rows nested at most this deep (0: outermost layers only)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not isinstance(args.kwargs, dict):
        parser.error(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    try:
        model = nnx.eval_shape(lambda: models.create(args.name, rngs=nnx.Rngs(0), **args.kwargs))
        result = summary(model, args.input)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table(args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
