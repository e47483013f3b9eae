"""Declarative state-dict transforms: interface, leaves, compositions and builders."""

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup
from d9d.model_state.mapper.adapters import (
    fused_experts_loading_mapper,
    identity_mapper_from_keys,
    identity_mapper_from_module,
    per_expert_to_fused_mapper,
)
from d9d.model_state.mapper.compose import ModelStateMapperParallel, ModelStateMapperSequential
from d9d.model_state.mapper.leaf import (
    ModelStateMapperChunkTensors,
    ModelStateMapperConcatenateTensors,
    ModelStateMapperDuplicate,
    ModelStateMapperIdentity,
    ModelStateMapperRename,
    ModelStateMapperSelectChildModules,
    ModelStateMapperSqueeze,
    ModelStateMapperStackTensors,
    ModelStateMapperTranspose,
    ModelStateMapperUnsqueeze,
    ModelStateMapperUnstackTensors,
)

__all__ = [
    "ModelStateMapper",
    "ModelStateMapperChunkTensors",
    "ModelStateMapperConcatenateTensors",
    "ModelStateMapperDuplicate",
    "ModelStateMapperIdentity",
    "ModelStateMapperParallel",
    "ModelStateMapperRename",
    "ModelStateMapperSelectChildModules",
    "ModelStateMapperSequential",
    "ModelStateMapperSqueeze",
    "ModelStateMapperStackTensors",
    "ModelStateMapperTranspose",
    "ModelStateMapperUnsqueeze",
    "ModelStateMapperUnstackTensors",
    "StateGroup",
    "fused_experts_loading_mapper",
    "identity_mapper_from_keys",
    "identity_mapper_from_module",
    "per_expert_to_fused_mapper",
]
