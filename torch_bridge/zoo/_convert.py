"""Zoo-specific steps of a conversion; :mod:`torch_bridge.convert` calls them for zoo names.

The zoo's JAX models carry ``model_name`` and ``config`` (the upstream constructor's
keyword arguments); upstream instances are recognised by their :class:`Family`. The
configuration read from an instance is checked against the module tree it builds
(:func:`check_structure`) before any weight moves.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import torch
from flax import nnx

from torch_bridge.errors import CheckpointError, UnsupportedModelError
from torch_bridge.zoo._family import family_for_name, family_for_torch
from torch_bridge.zoo._structure import check_structure


def is_zoo_jax(module: Any) -> bool:
    return isinstance(module, nnx.Module) and isinstance(getattr(module, "model_name", None), str)


def jax_config(module: nnx.Module) -> tuple[str, dict[str, Any]]:
    """(registered name, upstream kwargs) of a zoo JAX model."""
    return module.model_name, dict(module.config)


def torch_config(module: torch.nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(name, upstream kwargs) read from an upstream instance and checked against the tree they
    build; None when no family serves its class."""
    family = family_for_torch(module)
    if family is None:
        return None
    name, config = family.config_from_torch(module)
    check_structure(module, abstract_torch(name, config), source=f"{name} (torch)")
    return name, config


def abstract_torch(name: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """The upstream model ``name(**config)`` on the ``meta`` device (shapes only)."""
    family = family_for_name(name)
    try:
        with torch.device("meta"):
            return family.build_torch(name, dict(config))
    except (TypeError, ValueError, RuntimeError, OverflowError, AssertionError) as e:
        raise UnsupportedModelError(f"cannot build upstream {name} from config {dict(config)}: {e}") from e


def abstract_jax(name: str, config: Mapping[str, Any], *, param_dtype: Any = None, **options: Any) -> nnx.Module:
    """The zoo JAX model ``name(**config)``, abstract (``nnx.eval_shape``); ``options`` (``impl``,
    ``dtype``) go to the builder when it takes them."""
    from jaxdsc.models import get_builder

    family_for_name(name)  # the bridge must serve it both ways
    builder = get_builder(name)
    params = inspect.signature(builder).parameters
    kwargs = dict(config)
    if param_dtype is not None and "param_dtype" in params:
        kwargs["param_dtype"] = jnp.dtype(param_dtype)
    kwargs.update({k: v for k, v in options.items() if k in params and k != "rngs"})
    try:
        return nnx.eval_shape(lambda: builder(rngs=nnx.Rngs(0), **kwargs))
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise UnsupportedModelError(f"cannot build {name} from config {dict(config)}: {e}") from e


def fill_rng_state(module: nnx.Module, rngs: nnx.Rngs | None = None) -> None:
    """Give the RNG streams (dropout, stochastic depth) of an abstract model concrete keys:
    distinct keys folded from ``rngs["dropout"]()`` (or ``jax.random.key(0)``), counts 0."""
    base = rngs["dropout"]() if rngs is not None else jax.random.key(0)
    for i, (_, var) in enumerate(nnx.iter_graph(module)):
        if not isinstance(var, nnx.RngState) or not isinstance(var.get_value(), jax.ShapeDtypeStruct):
            continue
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(base, i))
        else:
            var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))


@contextlib.contextmanager
def unsupported_errors() -> Iterator[None]:
    """Key / shape / dtype mismatches of a zoo model raise :class:`UnsupportedModelError`."""
    try:
        yield
    except UnsupportedModelError:
        raise
    except CheckpointError as e:
        raise UnsupportedModelError(str(e)) from None
