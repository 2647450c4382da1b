"""The model of a run: a fresh :class:`jaxdsc.models.DSCNet`, or one initialised from weights.

``--init-from`` accepts

* a ``torch_bridge.save`` file (``.safetensors`` with jaxdsc metadata): class
  and config come from the file;
* a plain PyTorch state dict (``.pt``/``.pth``/``.bin``/``.ckpt``, read with
  ``torch.load(weights_only=True)``, or a metadata-less ``.safetensors``)
  plus ``--init-config`` (the PyTorch ``DSCNet`` constructor arguments);
* a ``jaxdsc-train`` workdir (or its checkpoint dir): its newest checkpoint,
  EMA weights when that run kept them.

The architecture (width, depth, activation, BN settings) then comes from
the source, not from ``--width``/``--depth``. When ``--num-classes`` differs
from the source's, the head is re-initialised.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxdsc.models import DSCNet, stage_config
from train.config import ConfigError, ModelConfig

DSCNET_TORCH_KEYS = {"num_classes", "in_channels", "width", "depth", "widths", "strides", "dilations", "kernel_size",
                     "stem_width", "activation", "se_ratio", "momentum", "eps"}


def precision_dtype(precision: str) -> Any:
    """The compute dtype of a ``--precision`` value (None: the parameters' float32)."""
    return jnp.bfloat16 if precision == "bfloat16" else None


def matmul_precision(precision: str) -> lax.PrecisionLike:
    """The ``precision`` argument of the model's ops for a ``--precision`` value."""
    return lax.DotAlgorithmPreset.BF16_BF16_F32 if precision == "bf16-matmul" else None


def compute_dtype(cfg: ModelConfig) -> Any:
    return precision_dtype(cfg.precision)


def dscnet_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The DSCNet architecture arguments of a model config (shared with the PyTorch reference)."""
    stages = {"widths": tuple(cfg.widths)} if cfg.widths else {"width": cfg.width}
    depth = tuple(cfg.depths) if cfg.depths else cfg.depth
    # No "stem_width" / "activation" / "se_ratio" key for the defaults: configs stay those of models built
    # before them.
    stem = {"stem_width": cfg.stem_width} if cfg.stem_width else {}
    act = {"activation": cfg.activation} if cfg.activation != ModelConfig.activation else {}
    se = {"se_ratio": cfg.se_ratio} if cfg.se_ratio else {}
    return {**stages, "depth": depth, "strides": tuple(cfg.strides), "dilations": tuple(cfg.dilations),
            "kernel_size": cfg.dw_kernel_size, **stem, **act, **se}


def describe(cfg: ModelConfig) -> str:
    """``dscnet w32 d2`` (the default stages) or ``dscnet widths 32-128-256 strides 1-2-2 d2 dil 1-2``."""
    default = ModelConfig()
    dash = lambda v: "-".join(map(str, v))  # noqa: E731
    extras = "" if cfg.dw_kernel_size == default.dw_kernel_size else f" k{cfg.dw_kernel_size}"
    extras += f" stem{cfg.stem_width}" if cfg.stem_width else ""
    extras += f" {cfg.activation}" if cfg.activation != default.activation else ""
    extras += f" se{cfg.se_ratio:g}" if cfg.se_ratio else ""
    depth = dash(cfg.depths) if cfg.depths else cfg.depth
    if not cfg.widths and cfg.strides == default.strides and cfg.dilations == default.dilations:
        return f"dscnet w{cfg.width} d{depth}{extras}"
    k = dscnet_kwargs(cfg)
    _, widths, strides, dilations = stage_config(k.get("width"), k.get("widths"), k["strides"], k["dilations"])
    return f"dscnet widths {dash(widths)} strides {dash(strides)} d{depth}{extras} dil {dash(dilations)}"


# Compiler options of the initialisation programs (:func:`compiled_init`: a model's parameters
# drawn in one compiled program instead of an eager op per parameter). At XLA's default CPU optimisation level the
# unrolled threefry/normal code of the initialisers takes most of a trainer process's start-up to
# compile (tiny preset: 12 s of compile on a loaded 2-core machine, 2.8 s at level 1), and the
# program runs once. Level 1 gives the same parameter bits as the default level and as eager
# construction (checked for the tiny and cifar10-cpu presets, a two-stage torchvision
# MobileNetV2 and a small U-Net); level 0 does not (the last bit of some normal draws differs).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compiled_init(init: Callable[..., tuple[nnx.GraphDef, nnx.State]], *static: Any, seed: int) -> nnx.Module:
    """``nnx.merge(*init(*static, seed))`` with ``init`` compiled (:data:`INIT_COMPILER_OPTIONS`; ``static``
    hashable, one program per value) or, under a trace (``nnx.eval_shape(lambda: build(...))``), traced
    along: ``jax.jit`` refuses compiler options on a nested jit."""
    key = jnp.asarray(seed, jnp.uint32)
    if isinstance(key, jax.core.Tracer):
        return nnx.merge(*init(*static, key))
    jitted = _JITTED.get(init)
    if jitted is None:
        jitted = _JITTED[init] = jax.jit(init, static_argnums=tuple(range(len(static))),
                                         compiler_options=INIT_COMPILER_OPTIONS)
    return nnx.merge(*jitted(*static, key))


_JITTED: dict[Callable[..., Any], Any] = {}


def _init_dscnet(num_classes: int, arch: tuple[tuple[str, Any], ...], momentum: float, precision: str, impl: str,
                 seed: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(DSCNet(num_classes, momentum=momentum, dtype=precision_dtype(precision), impl=impl,
                            precision=matmul_precision(precision),
                            rngs=nnx.Rngs(params=jax.random.key(seed)), **dict(arch)))


def build(cfg: ModelConfig, seed: int) -> DSCNet:
    """A freshly initialised model (float32 parameters; bf16 compute when asked)."""
    return compiled_init(_init_dscnet, cfg.num_classes, tuple(dscnet_kwargs(cfg).items()), cfg.bn_momentum,
                         cfg.precision, cfg.impl, seed=seed)


def _as_float32(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A bf16/f64 export still trains with float32 master weights.
    return {k: v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
            for k, v in tensors.items()}


def _init_config(text: str) -> dict[str, Any]:
    src = Path(text).expanduser()
    try:
        raw = src.read_text() if text.endswith(".json") else text
        config = json.loads(raw)
    except OSError as e:
        raise ConfigError(f"--init-config {text}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--init-config is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not set(config) <= DSCNET_TORCH_KEYS:
        raise ConfigError(f"--init-config must be a JSON object with keys from {sorted(DSCNET_TORCH_KEYS)}")
    # No "width": the twin's own default (32) applies unless "widths" is given.
    return {**{"num_classes": 10, "in_channels": 3, "depth": 2, "activation": "relu", "momentum": 0.1, "eps": 1e-5},
            **config}


def _from_torch_state(cfg: ModelConfig, torch_config: dict[str, Any], tensors: dict[str, np.ndarray],
                      source: str) -> DSCNet:
    from torch_bridge.convert import build_jax

    model = build_jax("DSCNet", torch_config, _as_float32(tensors), source=source, impl=cfg.impl,
                      dtype=compute_dtype(cfg))
    if not isinstance(model, DSCNet):
        raise ConfigError(f"{source}: holds a {type(model).__name__}, expected DSCNet")
    return model


def workdir_config(path: Path, ckpt: Path) -> ModelConfig:
    """The model section of the ``config.json`` beside a workdir's checkpoint."""
    cfg_file = next((p / "config.json" for p in (ckpt.parent.parent, path) if (p / "config.json").is_file()), None)
    if cfg_file is None:
        raise ConfigError(f"{path}: no config.json next to checkpoint {ckpt.name}")
    src = json.loads(cfg_file.read_text())["model"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in src.items() if k in known})


def _from_workdir(cfg: ModelConfig, path: Path, seed: int) -> nnx.Module:
    return load_workdir(cfg, path, seed)[0]


def load_workdir(cfg: ModelConfig, path: Path, seed: int) -> tuple[nnx.Module, ModelConfig]:
    """The newest checkpoint of a workdir (EMA weights when kept) in the model of its config.json
    (DSCNet or a zoo model), and that model config; ``cfg`` gives only the compute settings
    (impl, precision)."""
    from train import zoo_model
    from train.checkpointing import first_mismatch, flatten, read_arrays, unflatten

    arrays, ckpt = read_arrays(path)
    src = dataclasses.replace(workdir_config(path, ckpt), impl=cfg.impl, precision=cfg.precision)
    # Built by the compiled initialisers (the eager DSCNet took seconds, op by op); the checkpoint's
    # arrays replace the drawn ones below.
    model = zoo_model.build(src, seed) if zoo_model.is_zoo(src) else build(src, seed)
    prefix = "ema." if any(k.startswith("ema.") for k in arrays) else ""
    for kind, var in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(model, var)
        pure = nnx.to_pure_dict(state)
        flat = {k[len(prefix + kind) + 1:]: v for k, v in arrays.items() if k.startswith(f"{prefix}{kind}.")}
        problem = first_mismatch(flat, flatten(pure), extra_ok=True)
        if problem:  # before any array reaches the model: replace_by_pure_dict would not check
            raise ConfigError(f"{ckpt}: {kind} do not fit the model of its config.json: {problem}")
        nnx.replace_by_pure_dict(state, unflatten(pure, flat))
        nnx.update(model, state)
    return model, src


def initial_model(cfg: ModelConfig, seed: int) -> tuple[nnx.Module, str]:
    """The run's starting model and a one-line note on where it came from (zoo models:
    :mod:`train.zoo_model`)."""
    from train import zoo_model

    if zoo_model.is_zoo(cfg):
        if not cfg.init_from:
            return zoo_model.build(cfg, seed), ""
        path = Path(cfg.init_from).expanduser().absolute()
        if path.is_dir():  # a workdir of the same architecture: through its upstream state dict
            from torch_bridge.convert import torch_state_dict

            src, src_cfg = load_workdir(cfg, path, seed)
            if src_cfg.model != cfg.model:
                raise ConfigError(f"--init-from {path}: a {src_cfg.model} run, expected {cfg.model}")
            return zoo_model.init_from_tensors(cfg, torch_state_dict(src), str(path), seed,
                                              what="jaxdsc-train workdir")
        if not path.is_file():
            raise ConfigError(f"--init-from {path}: no such file or directory")
        return zoo_model.init_from(cfg, path, seed)
    if not cfg.init_from:
        return build(cfg, seed), ""
    import torch_bridge

    # Absolute: orbax refuses relative checkpoint paths.
    path = Path(cfg.init_from).expanduser().absolute()
    if not path.exists():
        raise ConfigError(f"--init-from {path}: no such file or directory")
    if path.is_dir():
        model, what = _from_workdir(cfg, path, seed), "jaxdsc-train checkpoint"
    elif cfg.init_config:
        tensors = torch_bridge.read_state_dict(path)
        model, what = _from_torch_state(cfg, _init_config(cfg.init_config), tensors, str(path)), "state dict"
    else:
        try:
            ckpt = torch_bridge.read(path)
        except torch_bridge.CheckpointError as e:
            if "no jaxdsc metadata" in str(e) or path.suffix != ".safetensors":
                raise ConfigError(f"--init-from {path}: not a torch_bridge.save file; for a plain PyTorch state "
                                  "dict also pass --init-config '{\"width\": ..., \"depth\": ...}'") from None
            raise
        if ckpt.name != "DSCNet":
            raise ConfigError(f"--init-from {path}: holds a {ckpt.name}, expected DSCNet")
        model, what = _from_torch_state(cfg, ckpt.config, ckpt.tensors, str(path)), "torch_bridge file"
    note = f"init from {what} {path} (widths={model.widths}, depth={model.depth}, kernel_size={model.kernel_size})"
    if model.num_classes != cfg.num_classes:
        note += f"; new {cfg.num_classes}-class head replaces the {model.num_classes}-class one"
        model.head = nnx.Linear(model.widths[2], cfg.num_classes, rngs=nnx.Rngs(params=seed))
        model.num_classes = cfg.num_classes
    return model, note
