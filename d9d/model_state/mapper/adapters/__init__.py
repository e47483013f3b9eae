"""Mapper builders."""

from d9d.model_state.mapper.adapters.experts import (
    PER_EXPERT_NAMES,
    fused_experts_loading_mapper,
    per_expert_to_fused_mapper,
)
from d9d.model_state.mapper.adapters.module import identity_mapper_from_keys, identity_mapper_from_module

__all__ = [
    "PER_EXPERT_NAMES",
    "fused_experts_loading_mapper",
    "identity_mapper_from_keys",
    "identity_mapper_from_module",
    "per_expert_to_fused_mapper",
]
