"""``jaxdsc-convert``: move weights between plain PyTorch state dicts and jaxdsc checkpoints.

Every conversion goes *source -> (class, config, tensors) -> validated twin -> output*:

* a **source** is recognised by one entry of :data:`SOURCES` (a jaxdsc
  ``.safetensors`` checkpoint, or a plain PyTorch state dict plus
  ``--class``/``--config``); new kinds of input are new entries there;
* the tensors are validated against the module that class and config build,
  in both frameworks (keys, shapes, dtypes) before anything is written;
* the **output** kind follows the output file's suffix: ``.safetensors`` is a
  jaxdsc checkpoint (state dict + class + config + SHA-256s), ``.pt`` /
  ``.pth`` / ``.bin`` / ``.ckpt`` a plain ``torch.save`` of a name -> tensor
  dict, loadable with ``torch.load(path, weights_only=True)``.

Pickle-based inputs are only ever read with ``torch.load(weights_only=True)``
(:func:`torch_bridge.read_state_dict`); anything else in them is refused and
never executed. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from jaxdsc import __version__
from jaxdsc._io import atomic_write_bytes
from torch_bridge.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    TORCH_PICKLE_SUFFIXES,
    read,
    read_safetensors,
    read_state_dict,
    save,
    strip_wrapper_prefixes,
)
from torch_bridge.convert import (
    abstract_jax,
    abstract_torch,
    build_torch,
    expected_torch_entries,
    float_dtype,
    module_config,
    validate_state,
)
from torch_bridge.errors import CheckpointError
from torch_bridge.spec import SPECS, spec_for_name
from torch_bridge.zoo import family_for_name, is_zoo_name

PROG = "jaxdsc-convert"
EXIT_OK = 0
EXIT_ERROR = 2
SAFETENSORS = ".safetensors"
OUTPUT_SUFFIXES = (SAFETENSORS, *TORCH_PICKLE_SUFFIXES)
WORKDIR_EXPORT = "jaxdsc-train export {dir} OUT.safetensors"


class UsageError(Exception):
    """A problem with the user's request or files: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Loaded:
    """What a source yields: a module class, its config (PyTorch names), its tensors (PyTorch layout)."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    kind: str  # how the source was read, for messages


@dataclass(frozen=True)
class Source:
    """One kind of input.

    ``open(path, args)`` returns ``None`` when ``path`` is not of this kind
    (the next source is tried), a :class:`Loaded` when it is, and raises
    :class:`UsageError` / ``CheckpointError`` when it is but cannot be used.
    """

    kind: str
    open: Callable[[Path, argparse.Namespace], Loaded | None]


# ---------------------------------------------------------------- sources
def _jaxdsc_checkpoint(path: Path, args: argparse.Namespace) -> Loaded | None:
    if not path.is_file() or path.suffix != SAFETENSORS:
        return None
    _, metadata = read_safetensors(path)  # validates the container; raises CheckpointError
    if metadata.get("format") != FORMAT:
        return None  # a plain safetensors state dict: the next source
    if args.class_name is not None or args.config is not None or args.arch is not None:
        raise UsageError(
            f"{path} is a jaxdsc checkpoint that records its own class and config; "
            "drop --class/--config and --arch (they are for plain PyTorch state dicts)"
        )
    ckpt = read(path)  # format, class, config, SHA-256s, shapes, dtypes
    return Loaded(ckpt.name, ckpt.config, ckpt.tensors, f"jaxdsc checkpoint v{ckpt.metadata['format_version']}")


def _plain_state_dict(path: Path, args: argparse.Namespace) -> Loaded | None:
    if not path.is_file() or path.suffix not in OUTPUT_SUFFIXES:  # the same suffixes are readable
        return None
    if args.arch is not None:
        return _upstream_state_dict(path, args)
    if args.class_name is None or args.config is None:
        missing = " and ".join(n for n, v in (("--class", args.class_name), ("--config", args.config)) if v is None)
        raise UsageError(
            f"{path} is a plain PyTorch state dict, which does not record its architecture: "
            f"pass {missing} (e.g. --class DSCNet --config '{{\"width\": 32, \"depth\": 2}}')"
        )
    tensors = read_state_dict(path)  # .pt & co. only via torch.load(weights_only=True)
    tensors, stripped = strip_wrapper_prefixes(tensors)
    kind = "plain state dict" + (f" (stripped the wrapper prefix {stripped!r})" if stripped else "")
    return Loaded(args.class_name, _parse_config(args.config, args.class_name), tensors, kind)


def _upstream_state_dict(path: Path, args: argparse.Namespace) -> Loaded:
    # --arch: a plain upstream (torchvision / timm) state dict as the hubs publish it; --config
    # holds the upstream constructor's arguments (default: the constructor's defaults).
    if args.class_name is not None:
        raise UsageError("--arch and --class are exclusive (--arch: zoo architectures, --class: jaxdsc modules)")
    if not is_zoo_name(args.arch):
        raise UsageError(f"--arch must name a zoo architecture 'origin:model' (e.g. torchvision:mobilenet_v2), "
                         f"got {args.arch!r}")
    try:
        family_for_name(args.arch)
    except ValueError as e:
        raise UsageError(f"--arch: {e}") from None
    config = _parse_config(args.config, args.arch) if args.config is not None else {}
    tensors, stripped = strip_wrapper_prefixes(read_state_dict(path))
    kind = "plain upstream state dict" + (f" (stripped the wrapper prefix {stripped!r})" if stripped else "")
    return Loaded(args.arch, config, tensors, kind)


SOURCES: list[Source] = [
    Source("jaxdsc checkpoint", _jaxdsc_checkpoint),
    Source("plain PyTorch state dict", _plain_state_dict),
]


def open_source(path: Path, args: argparse.Namespace) -> Loaded:
    """The first source that recognises ``path``."""
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():  # jaxdsc-train workdirs were accepted here once; the trainer exports them now
        raise UsageError(f"{path} is a directory; {PROG} converts files. To export a jaxdsc-train workdir "
                         f"run: {WORKDIR_EXPORT.format(dir=path)}")
    for source in SOURCES:
        loaded = source.open(path, args)
        if loaded is not None:
            return loaded
    raise UsageError(f"{path}: unknown input type {path.suffix!r}; expected .safetensors, .pt, .pth, .bin or .ckpt")


# ---------------------------------------------------------------- config
def _parse_config(text: str, class_name: str) -> dict[str, Any]:
    """``--config``: inline JSON or ``@file.json``; an object of PyTorch-style constructor args."""
    where = "--config"
    if text.startswith("@"):
        where = f"--config file {text[1:]}"
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{where} must be a JSON object of constructor arguments, got {type(config).__name__}")
    if is_zoo_name(class_name):  # --arch: upstream argument names, checked by the constructor
        return config
    try:
        spec = spec_for_name(class_name)
    except ValueError as e:
        raise UsageError(f"--class: {e}") from None
    # A common slip: JAX argument names. Say which PyTorch name to use instead.
    renames = {a.jax: a.torch for a in spec.args if a.jax != a.torch}
    wrong = [k for k in config if k in renames and renames[k] not in config]
    if wrong:
        hints = ", ".join(f"{k!r} -> {renames[k]!r}" for k in wrong)
        raise UsageError(f"{where} uses JAX argument names; the config takes PyTorch names: {hints}")
    return config


# ---------------------------------------------------------------- validation and output
def validate(loaded: Loaded, source: str) -> Any:
    """The torch twin holding ``loaded``'s tensors, after checking them against both frameworks."""
    try:
        twin = build_torch(loaded.name, loaded.config, loaded.tensors, source=source)
    except CheckpointError as e:  # e.g. a config the constructor refuses: still name the file
        raise CheckpointError(str(e) if source in str(e) else f"{source}: {e}") from None
    _, config = module_config(twin)  # complete: omitted arguments filled with their defaults
    dtype = float_dtype([a.dtype for a in loaded.tensors.values()])
    jax_module = abstract_jax(loaded.name, config, param_dtype=dtype)  # shapes only
    validate_state({k: (a.shape, a.dtype) for k, a in loaded.tensors.items()},
                   expected_torch_entries(jax_module), source=source)
    return twin


def write_output(twin: Any, path: Path) -> str:
    """Write ``twin`` to ``path`` in the format its suffix names; returns that format's name."""
    check_output_suffix(path)
    if path.suffix == SAFETENSORS:
        save(twin, path)
        return f"jaxdsc checkpoint v{FORMAT_VERSION}"
    # Tensors only (cloned: no shared storage, no module objects), so that
    # torch.load(..., weights_only=True) and load_state_dict() take it as is.
    state = {k: v.detach().clone() for k, v in twin.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return "plain PyTorch state dict"


def check_output_suffix(path: Path) -> None:
    if path.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(
            f"-o/--output {str(path)!r}: unknown output type {path.suffix!r}; expected {SAFETENSORS} "
            f"(jaxdsc checkpoint) or one of {', '.join(TORCH_PICKLE_SUFFIXES)} (plain PyTorch state dict)"
        )


def _counts(name: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    param_names = {n for n, _ in abstract_torch(name, config).named_parameters()}
    params = sum(math.prod(a.shape) for k, a in tensors.items() if k in param_names)
    buffers = sum(math.prod(a.shape) for k, a in tensors.items() if k not in param_names)
    dtypes = ", ".join(sorted({a.dtype.name for a in tensors.values()}))
    return f"{len(tensors)} tensors, {params:,} parameters, {buffers:,} buffer values ({dtypes})"


# ---------------------------------------------------------------- commands
def convert(args: argparse.Namespace) -> str:
    """Source file -> validated -> output file; returns the summary line."""
    src, out = Path(args.source), Path(args.output)
    check_output_suffix(out)  # before any work
    if out.exists() and not args.force:
        raise UsageError(f"-o/--output {str(out)!r} exists; pass --force to overwrite it")
    if out.resolve() == src.resolve():
        raise UsageError(f"-o/--output {str(out)!r} is the input file; write to another path")
    loaded = open_source(src, args)
    twin = validate(loaded, str(src))
    kind = write_output(twin, out)
    counts = _counts(loaded.name, module_config(twin)[1], loaded.tensors)
    return f"wrote {out} ({kind}): {loaded.name}, {counts}; from {src} ({loaded.kind})"


def info(path_text: str) -> list[str]:
    """Lines describing a checkpoint or state dict; hashes verified for jaxdsc checkpoints."""
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.suffix == SAFETENSORS:
        _, metadata = read_safetensors(path)
        if metadata.get("format") == FORMAT:
            ckpt = read(path)
            validate(Loaded(ckpt.name, ckpt.config, ckpt.tensors, "jaxdsc checkpoint"), str(path))
            return [
                f"{path}: jaxdsc checkpoint, format version {ckpt.metadata['format_version']}",
                f"class: {ckpt.name}",
                f"config: {json.dumps(ckpt.config, sort_keys=True)}",
                f"tensors: {_counts(ckpt.name, ckpt.config, ckpt.tensors)}",
                f"sha256: verified ({len(ckpt.tensors)} tensors and the config)",
            ]
    tensors = read_state_dict(path)  # refuses unknown suffixes and anything but weights
    values = sum(math.prod(a.shape) for a in tensors.values())
    dtypes = ", ".join(sorted({a.dtype.name for a in tensors.values()})) or "none"
    return [
        f"{path}: plain PyTorch state dict (no jaxdsc metadata, no hashes to verify)",
        f"tensors: {len(tensors)} tensors, {values:,} values ({dtypes})",
        "convert it with: jaxdsc-convert FILE --class NAME --config JSON -o OUT.safetensors",
    ]


# ---------------------------------------------------------------- argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _epilog() -> str:
    classes = ", ".join(s.name for s in SPECS)
    return f"""\
classes (--class): {classes}
--config takes the PyTorch twin's argument names (torch_bridge.nn), e.g. in_channels,
out_channels, stride, dilation, bias; omitted arguments take their defaults.

examples:
  # a PyTorch state dict of a DSCNet -> a jaxdsc checkpoint (validated before writing)
  {PROG} model.pt --class DSCNet --config '{{"width": 32, "depth": 2}}' -o model.safetensors
  {PROG} weights.safetensors --class SeparableConv --config @config.json -o conv.safetensors

  # a torchvision / timm state dict (as the hubs publish it) -> a jaxdsc checkpoint, and back
  {PROG} mbv2.pth --arch torchvision:mobilenet_v2 --config '{{"width_mult": 0.75}}' -o mbv2.safetensors
  {PROG} mbv2.safetensors -o mbv2_again.pth

  # a jaxdsc-train run (its newest checkpoint) -> a file for PyTorch users: the trainer does it
  jaxdsc-train export runs/cifar10 model.safetensors

  # a jaxdsc checkpoint -> a plain PyTorch state dict, for
  # twin.load_state_dict(torch.load("model.pt", weights_only=True))
  {PROG} model.safetensors -o model.pt

  # a re-validated copy (hashes, config, shapes, dtypes)
  {PROG} model.safetensors -o checked.safetensors

  # what is in a file (class, config, tensor and parameter counts; verifies hashes)
  {PROG} --info model.safetensors

Pickle files are read only with torch.load(weights_only=True): anything but tensors is
refused, never executed. Errors: one line on stderr, exit status 2.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert between plain PyTorch state dicts and jaxdsc .safetensors checkpoints "
        "(class + config + SHA-256 hashes), or describe a file.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", nargs="?", metavar="SOURCE",
                        help="input file: a jaxdsc .safetensors checkpoint, or a plain PyTorch state dict "
                        "(.pt, .pth, .bin, .ckpt or .safetensors) together with --class and --config "
                        "(a jaxdsc-train workdir: use `jaxdsc-train export WORKDIR OUT`)")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="output file; its suffix picks the format: .safetensors (jaxdsc checkpoint) "
                        "or .pt/.pth/.bin/.ckpt (plain PyTorch state dict)")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="module class of a plain state dict (see the list below)")
    parser.add_argument("--arch", metavar="NAME",
                        help="zoo architecture of a plain upstream state dict, e.g. torchvision:mobilenet_v2 "
                        "(--config then takes the upstream constructor's arguments; default: its defaults)")
    parser.add_argument("--config", metavar="JSON|@FILE",
                        help="constructor arguments of a plain state dict, PyTorch names: inline JSON "
                        "or @path/to/config.json")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--info", metavar="FILE",
                        help="describe FILE (class, config, tensors, parameters, format version) and "
                        "verify its hashes; no conversion")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxdsc-convert``; returns the exit status (0 ok, 2 error)."""
    try:
        args = build_parser().parse_args(argv)
        if args.info is not None:
            if args.source is not None or args.output is not None:
                raise UsageError("--info takes one FILE and no SOURCE or -o/--output")
            print("\n".join(info(args.info)))
            return EXIT_OK
        if args.source is None:
            raise UsageError("missing SOURCE (or use --info FILE); see --help")
        if args.output is None:
            raise UsageError("missing -o/--output OUT (.safetensors or .pt/.pth/.bin/.ckpt)")
        print(convert(args))
        return EXIT_OK
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_ERROR
    except (UsageError, CheckpointError, ValueError, TypeError, OSError) as e:
        # Expected failures (bad files, configs, paths): one line, no traceback.
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None:
            message = f"{e.filename}: {e.strerror or message}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
