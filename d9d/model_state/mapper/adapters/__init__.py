"""Mapper builders."""

from d9d.model_state.mapper.adapters.module import identity_mapper_from_keys, identity_mapper_from_module

__all__ = ["identity_mapper_from_keys", "identity_mapper_from_module"]
