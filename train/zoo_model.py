"""Zoo models in the trainer: ``--model torchvision:mobilenet_v2`` and friends.

Any :func:`jaxdsc.models.create` name other than DSCNet's (``dscnet`` /
``jaxdsc:dscnet``, which keep their own path in :mod:`train.model`) is built
here from ``--model-kwargs`` (the upstream constructor's keyword arguments)
and ``--num-classes``. The module tree mirrors upstream, so parameter paths
(``features.3.conv.1.0.kernel``, ``classifier.1.bias``) are upstream's module
names and ``--freeze`` / ``--head-lr`` patterns are written with them.

``--init-from`` takes a plain upstream state dict for the architecture
(``torch.load(weights_only=True)`` formats or ``.safetensors``, also a
``torch_bridge.save`` file of the same model). The *classifier* is found by
shape, not by name: the entries whose shape changes with ``num_classes``. When
the file's classifier has another number of classes, those entries are
re-initialised; any other difference (missing / unexpected key, other shape)
is refused, naming the key.

Upstream models do not normalise their input: the trainer feeds them
``(x - mean) / std`` of ``[0, 1]`` images (:func:`input_norm`, ImageNet's
statistics unless ``--model-kwargs`` or the model's ``config`` name
``input_mean`` / ``input_std``), and records both in ``summary.json`` and in
the exported file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.config import DSCNET_NAMES, ConfigError, ModelConfig
from train.model import compiled_init, precision_dtype

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_KEYS = ("input_mean", "input_std")


def is_zoo(cfg: ModelConfig) -> bool:
    """True for a ``--model`` other than DSCNet and the sequence tasks' TCN."""
    return cfg.model not in (*DSCNET_NAMES, "tcn")


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``--model-kwargs`` (JSON object) without the normalisation keys, plus ``num_classes`` and the
    segmentation models' own flags (``--backbone``, ``--no-separable-aspp``, ``--no-separable``)."""
    kwargs = _raw_kwargs(cfg)
    flags: dict[str, tuple[str, Any]] = {"num_classes": ("--num-classes", cfg.num_classes)}
    if cfg.model == "jaxdsc:deeplabv3plus":
        if cfg.backbone:
            flags["backbone"] = ("--backbone", cfg.backbone)
        if not cfg.separable_aspp:
            flags["separable_aspp"] = ("--no-separable-aspp", False)
    elif cfg.model == "jaxdsc:unet" and not cfg.separable:
        flags["separable"] = ("--no-separable", False)
    for key, (flag, value) in flags.items():
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"--model-kwargs {key}={kwargs[key]!r} disagrees with {flag} {value!r}; use {flag}")
    return {**{k: v for k, v in kwargs.items() if k not in NORM_KEYS}, **{k: v for k, (_, v) in flags.items()}}


def _raw_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.model_kwargs:
        return {}
    try:
        kwargs = json.loads(cfg.model_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {cfg.model_kwargs!r}")
    return kwargs


def normalizes_itself(model: nnx.Module | None) -> bool:
    """True for models that take ``[0, 1]`` images and normalise inside (``jaxdsc:unet``)."""
    from jaxdsc.norm import Normalize

    return isinstance(getattr(model, "normalize", None), Normalize)


def input_norm(cfg: ModelConfig, model: nnx.Module | None = None
               ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` per RGB channel applied to ``[0, 1]`` inputs of a zoo model; None when
    the model normalises its input itself (:func:`normalizes_itself`).

    ``--model-kwargs`` ``input_mean`` / ``input_std`` win, then the model's ``config``,
    then ImageNet's (torchvision's and most timm classifiers' convention).
    """
    if normalizes_itself(model):
        if any(k in _raw_kwargs(cfg) for k in NORM_KEYS):
            raise ConfigError(f"--model {cfg.model} normalises its [0, 1] input itself; drop input_mean/input_std "
                              "from --model-kwargs")
        return None
    sources = [_raw_kwargs(cfg), dict(getattr(model, "config", {}) or {})]
    out = []
    for key, default in zip(NORM_KEYS, (IMAGENET_MEAN, IMAGENET_STD), strict=True):
        value = next((s[key] for s in sources if s.get(key) is not None), default)
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{key} must be 3 numbers (RGB), got {value!r}")
        out.append(tuple(float(v) for v in value))
    if not all(s > 0 for s in out[1]):
        raise ConfigError(f"input_std must be positive, got {out[1]}")
    return out[0], out[1]


def _create(cfg: ModelConfig, seed: int, num_classes: int | None = None) -> nnx.Module:
    kwargs = model_kwargs(cfg)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return compiled_init(_init_zoo, cfg.model, json.dumps(kwargs, sort_keys=True), cfg.impl, cfg.precision,
                             seed=seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model {cfg.model} with --model-kwargs {json.dumps(kwargs)}: {e}") from None


def _init_zoo(name: str, kwargs_json: str, impl: str, precision: str, seed: jax.Array
                ) -> tuple[nnx.GraphDef, nnx.State]:
    # Compiled as one program (train.model.compiled_init): eager construction compiles and runs the
    # initialisers op by op (two-stage MobileNetV2: 15.7 s eager, 3.6 s compiled, same bits).
    from jaxdsc.models import create

    rngs = nnx.Rngs(params=jax.random.key(seed), dropout=jax.random.key(seed + 1))
    return nnx.split(create(name, rngs=rngs, impl=impl, dtype=precision_dtype(precision), **json.loads(kwargs_json)))


def build(cfg: ModelConfig, seed: int) -> nnx.Module:
    """A freshly initialised zoo model (float32 parameters; bf16 compute when asked)."""
    return _create(cfg, seed)


def classifier_keys(cfg: ModelConfig) -> set[str]:
    """Upstream state-dict keys whose shape depends on ``num_classes`` (the classifier's output layer)."""
    from torch_bridge.convert import expected_torch_entries

    a, b = (expected_torch_entries(nnx.eval_shape(lambda n=n: _create(cfg, 0, n)))
            for n in (cfg.num_classes, cfg.num_classes + 1))
    return {k for k in a if a[k][0] != b[k][0]}


def classifier_paths(cfg: ModelConfig) -> set[str]:
    """Trainer parameter paths (``classifier.1.kernel``) whose shape depends on ``num_classes``."""
    from train.optim import path_str

    def shapes(n: int) -> dict[str, tuple[int, ...]]:
        params = nnx.state(nnx.eval_shape(lambda: _create(cfg, 0, n)), nnx.Param)
        return {path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}

    a, b = shapes(cfg.num_classes), shapes(cfg.num_classes + 1)
    return {k for k in a if a[k] != b[k]}


def _read(cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    import torch_bridge
    from torch_bridge.checkpoint import FORMAT, read_safetensors, strip_wrapper_prefixes

    if path.suffix == ".safetensors" and read_safetensors(path)[1].get("format") == FORMAT:
        ckpt = torch_bridge.read(path)  # verified: hashes, class, config
        if ckpt.name != cfg.model:
            raise ConfigError(f"--init-from {path}: holds a {ckpt.name}, expected {cfg.model}")
        tensors = ckpt.tensors
    else:
        tensors = torch_bridge.read_state_dict(path)
    return strip_wrapper_prefixes(tensors)[0]


def init_from(cfg: ModelConfig, path: Path, seed: int) -> tuple[nnx.Module, str]:
    """A zoo model holding the upstream state dict in ``path`` (classifier re-initialised when its
    number of classes differs from ``--num-classes``); and a note on what happened."""
    from train.model import _as_float32

    return init_from_tensors(cfg, _as_float32(_read(cfg, path)), str(path), seed)


def init_from_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], source: str, seed: int, *,
                      what: str = "state dict") -> tuple[nnx.Module, str]:
    """:func:`init_from` on an upstream state dict already in memory (``source`` names it)."""
    from torch_bridge.convert import expected_torch_entries, load_torch_state_dict, torch_state_dict

    tensors = dict(tensors)
    model = _create(cfg, seed)
    expected = expected_torch_entries(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"--init-from {source}: not a {cfg.model} state dict for --model-kwargs "
                          f"{cfg.model_kwargs or '{}'}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    head = classifier_keys(cfg)
    differ = sorted(k for k in expected if tuple(tensors[k].shape) != tuple(expected[k][0]))
    other = [k for k in differ if k not in head]
    if other:
        k = other[0]
        raise ConfigError(f"--init-from {source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected "
                          f"{tuple(expected[k][0])} ({len(other)} such; only the classifier {sorted(head)} may differ)")
    note = f"init from {what} {source} ({cfg.model})"
    if differ:
        fresh = torch_state_dict(model)
        tensors = {**tensors, **{k: fresh[k] for k in head}}
        note += f"; new {cfg.num_classes}-class classifier ({', '.join(sorted(head))}) replaces the file's"
    load_torch_state_dict(model, tensors, source=source)
    return model, note


def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """``x -> (x - mean) / std`` over the channel axis of NHWC ``[0, 1]`` images."""
    m, s = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return lambda x: (x - m) / s


def metadata(mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, str]:
    """Export metadata naming the input convention (JSON lists of floats)."""
    return {"input_mean": json.dumps(list(mean)), "input_std": json.dumps(list(std)),
            "input_range": "RGB in [0, 1] (ToTensor), then (x - input_mean) / input_std"}


def describe(cfg: ModelConfig, kwargs: Mapping[str, Any] | None = None) -> str:
    """The ``model`` line of ``summary.json``."""
    return f"{cfg.model} {json.dumps(dict(kwargs if kwargs is not None else model_kwargs(cfg)), sort_keys=True)}"


def head_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Path prefixes that ``--head-lr`` applies to: DSCNet's ``head.``; for a zoo model the
    top-level module(s) holding the classifier (``classifier.``), found by shape."""
    if not is_zoo(cfg):
        return ("head.",)
    return tuple(sorted({p.split(".", 1)[0] + "." for p in classifier_paths(cfg)}))


def export(model: nnx.Module, path: str | Path, norm: tuple[tuple[float, ...], tuple[float, ...]] | None) -> Path:
    """``torch_bridge.save(model, path)`` plus the input convention in the metadata (zoo models)."""
    from torch_bridge.checkpoint import write_state
    from torch_bridge.convert import module_config, torch_state_dict

    name, config = module_config(model)
    return write_state(path, name, config, torch_state_dict(model), metadata(*norm) if norm else None)
