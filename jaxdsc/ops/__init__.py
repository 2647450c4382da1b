"""Functional kernels behind the modules (NHWC / channels-last, any spatial rank)."""

from jaxdsc.ops.depthwise import IMPLS, depthwise_conv, register_impl
from jaxdsc.ops.pointwise import pointwise_conv

__all__ = ["IMPLS", "depthwise_conv", "pointwise_conv", "register_impl"]
