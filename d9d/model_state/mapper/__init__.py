"""Declarative state-dict transforms: interface, leaves, compositions and builders."""

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup
from d9d.model_state.mapper.adapters import identity_mapper_from_module
from d9d.model_state.mapper.compose import ModelStateMapperParallel, ModelStateMapperSequential
from d9d.model_state.mapper.leaf import (
    ModelStateMapperDuplicate,
    ModelStateMapperIdentity,
    ModelStateMapperRename,
)

__all__ = [
    "ModelStateMapper",
    "ModelStateMapperDuplicate",
    "ModelStateMapperIdentity",
    "ModelStateMapperParallel",
    "ModelStateMapperRename",
    "ModelStateMapperSequential",
    "StateGroup",
    "identity_mapper_from_module",
]
