"""The model zoo's bridge: upstream torchvision / timm models <-> jaxdsc.models, exactly.

``torch_bridge.from_torch`` / ``to_torch`` / ``save`` / ``load`` and ``jaxdsc-convert
--arch`` dispatch here for upstream instances (a registered :class:`Family`) and for
JAX models carrying ``model_name`` / ``config``. One module per family registers
itself (see :data:`FAMILY_MODULES`).
"""

from torch_bridge.zoo._family import (
    FAMILY_MODULES,
    Family,
    family_for_name,
    family_for_torch,
    is_zoo_name,
    register_family,
    zoo_names,
)
from torch_bridge.zoo._structure import check_structure, describe

__all__ = [
    "FAMILY_MODULES",
    "Family",
    "check_structure",
    "describe",
    "family_for_name",
    "family_for_torch",
    "is_zoo_name",
    "register_family",
    "zoo_names",
]
