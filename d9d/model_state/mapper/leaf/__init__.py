"""Leaf mappers: each does one transform."""

from d9d.model_state.mapper.leaf.duplicate import ModelStateMapperDuplicate
from d9d.model_state.mapper.leaf.identity import ModelStateMapperIdentity
from d9d.model_state.mapper.leaf.rename import ModelStateMapperRename
from d9d.model_state.mapper.leaf.select_child import ModelStateMapperSelectChildModules
from d9d.model_state.mapper.leaf.single_tensor import (
    ModelStateMapperSqueeze,
    ModelStateMapperTranspose,
    ModelStateMapperUnsqueeze,
)
from d9d.model_state.mapper.leaf.stack import (
    ModelStateMapperChunkTensors,
    ModelStateMapperConcatenateTensors,
    ModelStateMapperStackTensors,
    ModelStateMapperUnstackTensors,
)

__all__ = [
    "ModelStateMapperChunkTensors",
    "ModelStateMapperConcatenateTensors",
    "ModelStateMapperDuplicate",
    "ModelStateMapperIdentity",
    "ModelStateMapperRename",
    "ModelStateMapperSelectChildModules",
    "ModelStateMapperSqueeze",
    "ModelStateMapperStackTensors",
    "ModelStateMapperTranspose",
    "ModelStateMapperUnsqueeze",
    "ModelStateMapperUnstackTensors",
]
