"""Mappers derived from a module's own state."""

from torch import nn

from d9d.model_state.mapper.leaf.identity import ModelStateMapperIdentity


def identity_mapper_from_module(module: nn.Module) -> ModelStateMapperIdentity:
    """An identity mapper over every key of ``module.state_dict()`` (parameters and persistent buffers)."""
    return ModelStateMapperIdentity(module.state_dict(keep_vars=True).keys())
