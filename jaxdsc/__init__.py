"""jaxdsc: depthwise-separable dilated convolutions for JAX / Flax NNX.

Modules (channels-last, 1-D/2-D/3-D from ``len(kernel_size)``):
:class:`DepthwiseConv`, :class:`PointwiseConv`, :class:`SeparableConv`,
:class:`Conv`, :class:`SeparableBlock`, :class:`ConvBlock`,
:class:`BatchNorm`, :class:`Normalize`, :class:`SqueezeExcite`; models in :mod:`jaxdsc.models`;
:func:`summary`: parameters and multiply-adds per layer (``python -m jaxdsc.summary NAME``).
PyTorch twins and exact conversion live in the ``torch_bridge`` package.
"""

from jaxdsc.blocks import ConvBlock, SeparableBlock
from jaxdsc.conv import Conv, DepthwiseConv, PointwiseConv, SeparableConv
from jaxdsc.norm import BatchNorm, Constant, Normalize
from jaxdsc.padding import PADDING_NAMES, Padding, resolve_padding
from jaxdsc.se import SqueezeExcite
from jaxdsc.summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "PADDING_NAMES",
    "BatchNorm",
    "Constant",
    "Conv",
    "ConvBlock",
    "DepthwiseConv",
    "Normalize",
    "Padding",
    "PointwiseConv",
    "SeparableBlock",
    "SeparableConv",
    "SqueezeExcite",
    "Summary",
    "resolve_padding",
    "summary",
]
