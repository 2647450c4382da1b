"""Command line of the trainer, generated from :mod:`train.config`.

    python -m train --preset tiny --data-dir data --workdir runs/tiny
    jaxdsc-train --preset cifar10-cpu --workdir runs/c10 --epochs 12 --lr 0.3
    jaxdsc-train export runs/c10 model.safetensors   # the run's model for PyTorch users (train.export)

Every config field is a flag (``--help`` lists them by section with their
defaults). ``--preset`` picks the starting config; explicit flags override
it. Bad flags, paths or data end the program with one ``jaxdsc-train:
error: ...`` line and a non-zero exit code (2: usage/config/data, 1: the run
failed, e.g. a diverged loss).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from train.config import PRESETS, SECTIONS, Config, ConfigError, validate, with_overrides

PROG = "jaxdsc-train"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _add_field(group: argparse._ArgumentGroup, name: str, hint: Any, default: Any, help_text: str) -> None:
    flag = "--" + name.replace("_", "-")
    shown = json.dumps(default) if isinstance(default, (list, str)) else default
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f"{help_text} (default: {shown})"}
    origin = typing.get_origin(hint)
    if hint is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif origin is typing.Literal:
        group.add_argument(flag, choices=typing.get_args(hint), metavar="{" + ",".join(typing.get_args(hint)) + "}",
                           **kw)
    elif origin is list:
        group.add_argument(flag, nargs="*", metavar="PATTERN", type=typing.get_args(hint)[0], **kw)
    else:
        path_like = name.endswith(("_dir", "workdir", "_from", "_torch", "_cache"))
        metavar = "PATH" if path_like else {int: "N", float: "X"}.get(hint, "TEXT")
        group.add_argument(flag, type=hint, metavar=metavar, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train jaxdsc models: CIFAR-10 (DSCNet or a zoo classifier), "
                                            "shapes-seg segmentation (DeepLabV3+, U-Net) or the TCN paper's "
                                            "sequence tasks. Rerunning a command with the "
                                            "same --workdir resumes it from its newest checkpoint. "
                                            "`jaxdsc-train export WORKDIR OUT.safetensors` writes a run's "
                                            "model for PyTorch users (see `jaxdsc-train export --help`).",
                     epilog="Environment: JAXDSC_MALLOC=default keeps glibc malloc's defaults (the trainer "
                            "otherwise keeps freed buffers: ~1.8x img/s on CPU, see train/malloc.py); "
                            "JAXDSC_TRAIN_FAULT injects faults for tests (train/faults.py).",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="starting config: tiny (CPU smoke test), cifar10-cpu (~30 min on 2 CPU cores), "
                             "cifar10 (accelerator, ~94%%); shapes-seg, shapes-seg-unet (segmentation: "
                             "DeepLabV3+ / U-Net, docs/segmentation.md); adding, copy, music-jsb, "
                             "music-nottingham (TCN sequence tasks, docs/sequences.md); flags override it")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    defaults = PRESETS["default"]
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        hints = typing.get_type_hints(cls)
        for f in cls.__dataclass_fields__.values():
            _add_field(group, f.name, hints[f.name], getattr(getattr(defaults, section), f.name),
                       f.metadata["help"])
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """``(Config, namespace)`` from command-line arguments; raises ``SystemExit`` (2) on bad flags."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items() if k not in ("preset", "show_config")}
    try:
        cfg = validate(with_overrides(PRESETS[ns.preset], overrides))
    except ConfigError as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    return cfg, ns


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: reported as one line, no traceback."""
    from train.checkpointing import RestoreError
    from train.data import DataError

    errors: list[type[BaseException]] = [ConfigError, DataError, RestoreError, OSError]
    bridge = sys.modules.get("torch_bridge.errors")  # imported only when --init-from/--export-torch used it
    if bridge is not None:
        errors.append(bridge.CheckpointError)
    return tuple(errors)


def _export(argv: Sequence[str]) -> int:
    from train.export import main as export_main

    try:
        print(export_main(argv, PROG, _Parser), flush=True)
    except SystemExit as e:  # --help, or a usage error already reported in one line
        return e.code if isinstance(e.code, int) else 2
    except _user_errors() as e:
        print(f"{PROG} export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxdsc-train`` / ``python -m train``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    cfg, ns = parse(argv)
    if ns.show_config:
        try:
            print(json.dumps(cfg.to_dict(), indent=1), flush=True)
        except BrokenPipeError:  # `--show-config | head`: the reader left, which is fine
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from train import malloc

    malloc.tune()  # before XLA starts its threads (they would get their own arenas)
    from train.faults import active
    from train.loop import TrainingError, run

    try:
        active()  # a malformed fault spec is a usage error, reported before anything runs
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    except _user_errors() as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
