"""Leaf mappers: each does one transform."""

from d9d.model_state.mapper.leaf.duplicate import ModelStateMapperDuplicate
from d9d.model_state.mapper.leaf.identity import ModelStateMapperIdentity
from d9d.model_state.mapper.leaf.rename import ModelStateMapperRename

__all__ = [
    "ModelStateMapperDuplicate",
    "ModelStateMapperIdentity",
    "ModelStateMapperRename",
]
