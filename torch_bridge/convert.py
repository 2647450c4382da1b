"""Exact, table-driven conversion between jaxdsc modules and their PyTorch twins.

Everything here is generic: the per-type knowledge (argument names, tensor
names, layouts) is in :mod:`torch_bridge.spec`. Values are moved as NumPy
arrays in PyTorch layout ("torch state dicts"), so the same code serves
in-memory conversion and checkpoint files. Shapes, dtypes and key sets are
validated against an *abstract* target (``nnx.eval_shape`` / the ``meta``
device) before any array is built or copied.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx

from torch_bridge.errors import CheckpointError
from torch_bridge.spec import JAX_CONTAINERS, ModuleSpec, spec_for, spec_for_name, spec_or_none
from torch_bridge.zoo import _convert as zoo
from torch_bridge.zoo._family import is_zoo_name

Entry = tuple[tuple[int, ...], np.dtype]  # expected (shape, dtype) of one torch tensor

_BF16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------- tensors <-> numpy
def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU copy of ``t`` as NumPy (bfloat16 via ml_dtypes), bit-exact."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16).copy()
    return t.numpy().copy()


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`tensor_to_numpy`."""
    a = np.array(a, order="C", copy=True)  # (np.ascontiguousarray would turn 0-d into 1-d)
    if a.dtype == _BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- walking JAX modules
def _iter_jax(module: nnx.Module) -> Iterator[tuple[tuple[Any, ...], str, nnx.Module, ModuleSpec]]:
    """(path, torch-style key prefix, submodule, spec) for every module in the tree with a spec.

    Modules without one (containers, activations, pooling, the zoo's composite blocks) hold
    no tensors of their own; their children are visited, and :func:`_check_covered`
    refuses any Variable that no rule covers.
    """
    for path, sub in nnx.iter_modules(module):
        spec = None if isinstance(sub, JAX_CONTAINERS) else spec_or_none(sub)
        if spec is not None:
            yield tuple(path), "".join(f"{p}." for p in path), sub, spec


def _check_covered(module: nnx.Module, covered: set[tuple[Any, ...]]) -> None:
    """Refuse to drop state silently: every Variable must have a tensor rule.

    RNG streams (dropout, stochastic depth) are not model state in PyTorch and are exempt.
    """
    stray = [p for p, v in nnx.to_flat_state(nnx.state(module))
             if tuple(p) not in covered and not isinstance(v, nnx.RngState)]
    if stray:
        names = ", ".join(".".join(map(str, p)) for p in stray[:5])
        raise TypeError(f"no conversion rule covers these variables: {names}")


def expected_torch_entries(module: nnx.Module) -> dict[str, Entry]:
    """torch state-dict key -> (shape, dtype) that ``module`` (possibly abstract) converts to."""
    entries: dict[str, Entry] = {}
    covered: set[tuple[Any, ...]] = set()
    for path, prefix, sub, spec in _iter_jax(module):
        for rule in spec.tensors:
            var = getattr(sub, rule.jax)
            if var is None:
                continue
            value = var.get_value()
            shape = rule.layout.torch_shape(tuple(value.shape), spec.rank(sub))
            dtype = np.int64 if rule.layout.name == "counter" else value.dtype
            entries[prefix + rule.torch] = (shape, np.dtype(dtype))
            covered.add((*path, rule.jax))
    _check_covered(module, covered)
    return entries


def torch_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The PyTorch-layout state dict of a JAX module, as NumPy arrays."""
    expected_torch_entries(module)  # coverage check
    out: dict[str, np.ndarray] = {}
    for _, prefix, sub, spec in _iter_jax(module):
        for rule in spec.tensors:
            var = getattr(sub, rule.jax)
            if var is not None:
                out[prefix + rule.torch] = rule.layout.to_torch(np.asarray(var.get_value()), spec.rank(sub))
    return out


def validate_state(
    state: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    expected: Mapping[str, Entry],
    *,
    source: str,
) -> None:
    """Check keys, shapes and dtypes of ``state`` (key -> (shape, dtype)) against ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:6])}")
        raise CheckpointError(f"{source}: {'; '.join(parts)}")
    for key, (shape, dtype) in expected.items():
        got_shape, got_dtype = state[key]
        if tuple(got_shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(got_shape)}, expected {tuple(shape)}"
            )
        if np.dtype(got_dtype) != np.dtype(dtype):
            raise CheckpointError(
                f"{source}: tensor {key!r} has dtype {np.dtype(got_dtype).name}, expected "
                f"{np.dtype(dtype).name} (no silent casts)"
            )


def load_torch_state_dict(module: nnx.Module, state: Mapping[str, np.ndarray], *, source: str = "state dict") -> None:
    """Fill ``module`` (concrete or abstract) from a PyTorch-layout state dict, after validating all of it."""
    validate_state({k: (v.shape, v.dtype) for k, v in state.items()}, expected_torch_entries(module), source=source)
    for _, prefix, sub, spec in _iter_jax(module):
        for rule in spec.tensors:
            var = getattr(sub, rule.jax)
            if var is not None:
                var.set_value(jnp.asarray(rule.layout.to_jax(np.asarray(state[prefix + rule.torch]))))


# ---------------------------------------------------------------- building modules
def module_config(module: Any) -> tuple[str, dict[str, Any]]:
    """(class name, constructor kwargs with PyTorch names) of a JAX or torch module.

    Zoo models: (registered name, upstream kwargs); for an upstream instance they are read
    from it and checked against the module tree they build.
    """
    if zoo.is_zoo_jax(module):
        return zoo.jax_config(module)
    if isinstance(module, torch.nn.Module) and spec_or_none(module) is None:
        found = zoo.torch_config(module)
        if found is not None:
            return found
    spec = spec_for(module)
    return spec.name, spec.torch_config(module)


def float_dtype(dtypes: list[np.dtype]) -> np.dtype | None:
    """The one floating dtype among ``dtypes`` (None if there is none); mixed floats are an error."""
    floats = {d for d in dtypes if np.issubdtype(d, np.floating) or d == _BF16}
    if len(floats) > 1:
        raise CheckpointError(f"tensors mix floating dtypes {sorted(d.name for d in floats)}; expected one")
    return floats.pop() if floats else None


def abstract_jax(name: str, torch_config: Mapping[str, Any], *, param_dtype: Any = None, **options: Any) -> nnx.Module:
    """An abstract (shape-only) JAX module of class ``name``; no arrays are allocated.

    ``options`` (e.g. ``impl``, ``dtype``) are passed when the constructor takes them.
    """
    if is_zoo_name(name):
        return zoo.abstract_jax(name, torch_config, param_dtype=param_dtype, **options)
    spec = spec_for_name(name)
    kwargs = spec.jax_kwargs(dict(torch_config))
    params = inspect.signature(spec.jax_cls.__init__).parameters
    if param_dtype is not None and "param_dtype" in params:
        kwargs["param_dtype"] = jnp.dtype(param_dtype)
    kwargs.update({k: v for k, v in options.items() if k in params})
    rngs = {"rngs": True} if spec.jax_takes_rngs else {}
    try:
        # The Rngs must be created inside the traced function.
        return nnx.eval_shape(lambda: spec.jax_cls(**kwargs, **{k: nnx.Rngs(0) for k in rngs}))
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # also absurd sizes
        raise CheckpointError(f"cannot build {name} from config {dict(torch_config)}: {e}") from e


def build_jax(name: str, torch_config: Mapping[str, Any], state: Mapping[str, np.ndarray], *,
              source: str = "state dict", **options: Any) -> nnx.Module:
    """A JAX module of class ``name`` holding the PyTorch-layout ``state``.

    Zoo models: ``options["rngs"]`` (an ``nnx.Rngs``) seeds their dropout / stochastic-depth
    streams (default: key 0).
    """
    if is_zoo_name(name):
        rngs = options.pop("rngs", None)
        with zoo.unsupported_errors():
            dtype = float_dtype([np.asarray(v).dtype for v in state.values()])
            module = abstract_jax(name, torch_config, param_dtype=dtype, **options)
            load_torch_state_dict(module, state, source=source)
        zoo.fill_rng_state(module, rngs)
        return module
    dtype = float_dtype([np.asarray(v).dtype for v in state.values()])
    module = abstract_jax(name, torch_config, param_dtype=dtype, **options)
    load_torch_state_dict(module, state, source=source)
    return module


def abstract_torch(name: str, torch_config: Mapping[str, Any]) -> torch.nn.Module:
    """A torch twin (or zoo: the upstream model) on the ``meta`` device (shapes only)."""
    if is_zoo_name(name):
        return zoo.abstract_torch(name, torch_config)
    spec = spec_for_name(name)
    try:
        with torch.device("meta"):
            return spec.torch_cls(**dict(torch_config))
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # also absurd sizes
        raise CheckpointError(f"cannot build torch {name} from config {dict(torch_config)}: {e}") from e


def build_torch(name: str, torch_config: Mapping[str, Any], state: Mapping[str, np.ndarray], *,
                source: str = "state dict") -> torch.nn.Module:
    """A torch twin of class ``name`` holding ``state`` (NumPy arrays), validated first."""
    if is_zoo_name(name):
        with zoo.unsupported_errors():
            return _build_torch(name, torch_config, state, source=source)
    return _build_torch(name, torch_config, state, source=source)


def _build_torch(name: str, torch_config: Mapping[str, Any], state: Mapping[str, np.ndarray], *,
                 source: str) -> torch.nn.Module:
    module = abstract_torch(name, torch_config)
    dtype = float_dtype([np.asarray(v).dtype for v in state.values()])
    if dtype is not None and dtype != np.float32:
        module = module.to(numpy_to_tensor(np.zeros((), dtype)).dtype)
    expected = {k: (tuple(t.shape), tensor_to_numpy_dtype(t.dtype)) for k, t in module.state_dict().items()}
    validate_state({k: (v.shape, v.dtype) for k, v in state.items()}, expected, source=source)
    module = module.to_empty(device="cpu")
    module.load_state_dict({k: numpy_to_tensor(np.asarray(v)) for k, v in state.items()}, strict=True)
    return module


def tensor_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        return _BF16
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


# ---------------------------------------------------------------- public API
def _jax_training(module: nnx.Module) -> bool | None:
    # BatchNorm's use_running_average and dropout's deterministic: nnx's .eval() sets both.
    flags = [getattr(m, a) for _, m in nnx.iter_modules(module)
             for a in ("use_running_average", "deterministic") if hasattr(m, a)]
    return None if not flags else not all(flags)


def to_torch(module: nnx.Module) -> torch.nn.Module:
    """The PyTorch twin of a jaxdsc module, with identical weights and buffers.

    A zoo model (``jaxdsc.models.create("torchvision:...")``) becomes an instance of the
    upstream class (torchvision / timm must be installed). The twin is in eval mode when the JAX module's BatchNorms use running averages.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module from jaxdsc, got {type(module).__name__}")
    name, config = module_config(module)
    twin = build_torch(name, config, torch_state_dict(module), source=f"{name} (JAX)")
    training = _jax_training(module)
    if training is not None:
        twin.train(training)
    return twin


def from_torch(module: torch.nn.Module, **options: Any) -> nnx.Module:
    """The jaxdsc module twin of a torch_bridge module or a supported upstream model
    (torchvision / timm, configuration read from the instance), with identical weights and
    buffers. Unsupported upstream models raise :class:`~torch_bridge.UnsupportedModelError`.

    ``options`` go to the JAX constructor when it takes them (``impl``, ``dtype``,
    ``precision``). The result is in eval mode when ``module`` is.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module from torch_bridge.nn or a supported upstream "
                        f"model, got {type(module).__name__}")
    name, config = module_config(module)
    state = {k: tensor_to_numpy(v) for k, v in module.state_dict().items()}
    twin = build_jax(name, config, state, source=f"{name} (torch)", **options)
    if not module.training:
        twin.eval()
    return twin
