"""Functional kernels behind the modules (NHWC / channels-last, any spatial rank).

Importing this package registers every depthwise implementation: ``"xla"``
(reference), ``"shift"`` (pure JAX) and ``"native"`` (C++ via ``jax.ffi``,
CPU only, present only when its shared library was built and loads).
The pointwise conv has ``impl="xla"`` (``dot_general``) and ``"native"``
(the same library's GEMM), see :mod:`jaxdsc.ops.pointwise`; the dense conv
``"xla"`` and ``"patches"`` (im2col + that GEMM), see :mod:`jaxdsc.ops.dense`.
``separable_conv`` chains depthwise and pointwise, its forward fused into one
native kernel on CPU (:mod:`jaxdsc.ops.separable`). ``batch_norm_act_train``
is train-mode batch norm with an optional fused ReLU, ``"xla"`` or ``"native"``
(:mod:`jaxdsc.ops.batchnorm`).
"""

from jaxdsc.ops import native as _native  # noqa: F401  (registers "native")
from jaxdsc.ops import shift as _shift  # noqa: F401  (registers "shift")
from jaxdsc.ops.batchnorm import BN_IMPLS, batch_norm_act_train, select_batch_norm_impl
from jaxdsc.ops.dense import DENSE_IMPLS, dense_conv, select_dense_impl
from jaxdsc.ops.depthwise import IMPLS, depthwise_conv, register_impl, select_impl
from jaxdsc.ops.pointwise import PW_IMPLS, pointwise_conv, select_pointwise_impl
from jaxdsc.ops.separable import separable_conv

__all__ = [
    "BN_IMPLS",
    "DENSE_IMPLS",
    "IMPLS",
    "PW_IMPLS",
    "batch_norm_act_train",
    "dense_conv",
    "depthwise_conv",
    "pointwise_conv",
    "register_impl",
    "select_batch_norm_impl",
    "select_dense_impl",
    "select_impl",
    "select_pointwise_impl",
    "separable_conv",
]
