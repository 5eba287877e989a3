"""Pre-trained block pools cut from timm models (manifest + safetensors).

It knows nothing of MPI or FL and imports no other fedemu package. Names load lazily (PEP 562):
``from pools.errors import PoolError`` must not pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pools.blocks": ("FAMILIES", "Block", "compose", "cut_model", "describe_blocks", "family_of"),
    "pools.errors": ("PoolError",),
    "pools.info": ("BlockInfo", "Signature"),
    "pools.pretrain": ("linear_probe", "pretrain_pool"),
    "pools.sources": ("SOURCES", "build_pool", "create_pool", "create_timm", "get_source", "register_source"),
    "pools.stitch": ("JoinCost", "Stitch", "Stitched", "can_join", "fit_residual", "fit_rows", "join_cost",
                     "join_matrix", "make_stitch", "set_linear", "solve_linear", "stitched"),
    "pools.store": ("SCHEMA_VERSION", "Pool", "write_pool"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pools' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
