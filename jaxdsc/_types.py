"""Shared type aliases and array checks for the JAX modules."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any  # a jnp dtype or anything jnp.dtype() accepts


def check_float_input(x: object, name: str = "x") -> None:
    """Raise TypeError unless ``x`` is a floating-point array."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")


def is_array(x: object) -> bool:
    return isinstance(x, jax.Array) or hasattr(x, "__array__")
