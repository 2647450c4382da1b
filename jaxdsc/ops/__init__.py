"""Functional kernels behind the modules (NHWC / channels-last, any spatial rank).

Importing this package registers every depthwise implementation: ``"xla"``
(reference), ``"shift"`` (pure JAX) and ``"native"`` (C++ via ``jax.ffi``,
CPU only, present when its shared library was built; loaded and self-checked
on first use, :mod:`jaxdsc.ops.native`). The pointwise conv has
``impl="xla"`` (``dot_general``) and ``"native"`` (the same library's GEMM),
see :mod:`jaxdsc.ops.pointwise`; the dense conv ``"xla"``, ``"native"`` (that
GEMM over implicit im2col rows) and ``"patches"`` (im2col + that GEMM), see
:mod:`jaxdsc.ops.dense`. ``separable_conv`` chains
depthwise and pointwise, its forward fused into one native kernel on CPU
(:mod:`jaxdsc.ops.separable`). ``batch_norm_act_train`` is train-mode batch
norm with an optional fused ReLU, ``"xla"`` or ``"native"``
(:mod:`jaxdsc.ops.batchnorm`).

``impl="auto"`` is chosen per platform inside the program and after the
active :func:`impl_policy` (:mod:`jaxdsc.ops._select`); under a batch-sharded
``jit`` the native calls run per shard (:mod:`jaxdsc.ops._partition`).
Importing starts no JAX backend and runs nothing.
"""

from jaxdsc.ops import native_depthwise as _native_depthwise  # noqa: F401  (registers "native")
from jaxdsc.ops import shift as _shift  # noqa: F401  (registers "shift")
from jaxdsc.ops._select import IMPL_TABLE, POLICIES, current_policy, impl_policy
from jaxdsc.ops.batchnorm import BN_IMPLS, batch_norm_act_train, select_batch_norm_impl
from jaxdsc.ops.dense import DENSE_IMPLS, dense_conv, select_dense_impl
from jaxdsc.ops.depthwise import IMPLS, depthwise_conv, register_impl, select_impl
from jaxdsc.ops.pointwise import PW_IMPLS, pointwise_conv, select_pointwise_impl
from jaxdsc.ops.separable import separable_conv

__all__ = [
    "BN_IMPLS",
    "DENSE_IMPLS",
    "IMPLS",
    "IMPL_TABLE",
    "POLICIES",
    "PW_IMPLS",
    "batch_norm_act_train",
    "current_policy",
    "dense_conv",
    "depthwise_conv",
    "impl_policy",
    "pointwise_conv",
    "register_impl",
    "select_batch_norm_impl",
    "select_dense_impl",
    "select_impl",
    "select_pointwise_impl",
    "separable_conv",
]
