"""Activations by name.

Modules take activations as names (not callables) so that their configs are
plain JSON and the PyTorch twins can look up the same function by the same
name (``torch_bridge.nn.TORCH_ACTIVATIONS``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]

ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    # jax.nn.gelu defaults to the tanh approximation; torch's default is exact.
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "hard_swish": jax.nn.hard_swish,
    "elu": jax.nn.elu,
    "leaky_relu": partial(jax.nn.leaky_relu, negative_slope=0.01),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": jax.nn.hard_sigmoid,  # relu6(x + 3) / 6, torch's hardsigmoid (MobileNetV3's SE gate)
}


def check_activation(name: str, value: object) -> str | None:
    """Validate an activation name (None means identity)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be an activation name (one of {sorted(ACTIVATIONS)}) or None, "
            f"got {value!r} ({type(value).__name__})"
        )
    if value not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {sorted(ACTIVATIONS)} or None, got {value!r}")
    return value


def apply_activation(name: str | None, x: jax.Array) -> jax.Array:
    return x if name is None else ACTIVATIONS[name](x)
