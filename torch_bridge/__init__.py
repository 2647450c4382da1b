"""torch_bridge: PyTorch twins of the jaxdsc modules and exact two-way conversion.

- :mod:`torch_bridge.nn`: a PyTorch module for every jaxdsc module (NCHW).
- :func:`to_torch` / :func:`from_torch`: structure and weights, bit-exact.
- :func:`save` / :func:`load`: one ``.safetensors`` file with a PyTorch
  state dict plus class/config metadata, readable by plain PyTorch.
- :mod:`torch_bridge.zoo`: torchvision / timm models <-> ``jaxdsc.models`` zoo models
  (through the same functions: ``from_torch(torchvision.models.mobilenet_v2())``).
- ``jaxdsc-convert``: the command-line converter (:mod:`torch_bridge.cli`).
"""

from torch_bridge import nn
from torch_bridge.checkpoint import (
    Checkpoint,
    load,
    read,
    read_state_dict,
    save,
    strip_wrapper_prefixes,
)
from torch_bridge.convert import from_torch, to_torch, torch_state_dict
from torch_bridge.errors import CheckpointError, UnsupportedModelError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "UnsupportedModelError",
    "from_torch",
    "load",
    "nn",
    "read",
    "read_state_dict",
    "save",
    "strip_wrapper_prefixes",
    "to_torch",
    "torch_state_dict",
]
