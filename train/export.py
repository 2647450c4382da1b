"""``jaxdsc-train export WORKDIR OUT``: a trainer workdir's model as a file for PyTorch users.

    jaxdsc-train export runs/cifar10 model.safetensors   # torch_bridge.save: state dict + class + config
    python -m train export runs/cifar10 model.pt          # plain torch.save state dict (weights_only=True)

The model is the newest checkpoint of the workdir (a workdir, its
``checkpoints/`` or one ``step_*`` dir), with the EMA weights when the run
kept them, as ``--init-from WORKDIR`` reads it; its architecture comes from
the workdir's ``config.json``. Reading a workdir is the trainer's business, so
this lives here and not in ``jaxdsc-convert`` (which converts files, and
depends on nothing in ``train``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from train.config import ConfigError, ModelConfig

USAGE = "jaxdsc-train export WORKDIR OUT [--force]"


def build_parser(prog: str, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                 ) -> argparse.ArgumentParser:
    parser = parser_class(
        prog=f"{prog} export", description="Write the model of a jaxdsc-train workdir (its newest checkpoint, "
        "EMA weights if kept) for PyTorch users.")
    parser.add_argument("workdir", metavar="WORKDIR", help="a jaxdsc-train workdir, its checkpoints/ or a step_* dir")
    parser.add_argument("output", metavar="OUT", help="output file: .safetensors (torch_bridge.save: state dict + "
                        "class + config + SHA-256s) or .pt/.pth/.bin/.ckpt (plain torch.save state dict)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser


def export_workdir(workdir: str | Path, output: str | Path, *, force: bool = False) -> str:
    """Write the workdir's model to ``output`` (format from its suffix); returns a one-line summary.

    Raises ``ConfigError`` for a bad request (unknown suffix, existing output, no checkpoint).
    """
    from torch_bridge.cli import OUTPUT_SUFFIXES, write_output
    from torch_bridge.convert import to_torch
    from train import zoo_model
    from train.model import load_workdir

    # Absolute: orbax refuses relative checkpoint paths.
    src, out = Path(workdir).expanduser().absolute(), Path(output).expanduser()
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"OUT {str(out)!r}: unknown output type {out.suffix!r}; expected one of "
                          f"{', '.join(OUTPUT_SUFFIXES)}")
    if out.exists() and not force:
        raise ConfigError(f"OUT {str(out)!r} exists; pass --force to overwrite it")
    if not src.is_dir():
        raise ConfigError(f"WORKDIR {str(src)!r} is not a directory (a jaxdsc-train workdir); to convert a file "
                          "use jaxdsc-convert")
    try:
        model, cfg = load_workdir(ModelConfig(), src, seed=0)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    twin = to_torch(model)
    n = sum(int(p.numel()) for p in twin.parameters())
    if zoo_model.is_zoo(cfg):
        what = zoo_model.describe(cfg)
        norm = zoo_model.input_norm(cfg, model)
        if out.suffix == ".safetensors":  # the input convention travels in the metadata
            zoo_model.export(model, out, norm)
            kind = "jaxdsc checkpoint"
        else:
            kind = write_output(twin, out)
        if norm:
            what += f", input (x - {list(norm[0])}) / {list(norm[1])} on [0, 1] RGB"
    else:
        kind, what = write_output(twin, out), f"DSCNet width={model.width} depth={model.depth}"
    return f"wrote {out} ({kind}): {what}, {n:,} parameters; from {src}"


def main(argv: Sequence[str], prog: str, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
         ) -> str:
    """Parse ``export`` arguments and export; returns the summary line (``SystemExit`` on bad flags)."""
    args = build_parser(prog, parser_class).parse_args(argv)
    return export_workdir(args.workdir, args.output, force=args.force)
