"""Functional kernels behind the modules (NHWC / channels-last, any spatial rank).

Importing this package registers every depthwise implementation: ``"xla"``
(reference), ``"shift"`` (pure JAX) and ``"native"`` (C++ via ``jax.ffi``,
CPU only, present only when its shared library was built and loads).
"""

from jaxdsc.ops import native as _native  # noqa: F401  (registers "native")
from jaxdsc.ops import shift as _shift  # noqa: F401  (registers "shift")
from jaxdsc.ops.depthwise import IMPLS, depthwise_conv, register_impl, select_impl
from jaxdsc.ops.pointwise import pointwise_conv

__all__ = ["IMPLS", "depthwise_conv", "pointwise_conv", "register_impl", "select_impl"]
