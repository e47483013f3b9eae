"""Mappers derived from a module's own state, or from a list of keys."""

from collections.abc import Iterable

from torch import nn

from d9d.model_state.mapper.compose.parallel import ModelStateMapperParallel
from d9d.model_state.mapper.leaf.identity import ModelStateMapperIdentity
from d9d.model_state.mapper.leaf.names import require_names


def identity_mapper_from_keys(keys: Iterable[str]) -> ModelStateMapperParallel:
    """One identity per key, side by side (an empty collection gives a mapper with no group).

    Raises:
        TypeError: If ``keys`` is a bare ``str`` (use ``ModelStateMapperIdentity(key)`` for one key).
    """
    names = require_names("identity_mapper_from_keys", "keys", keys, at_least=0)
    return ModelStateMapperParallel([ModelStateMapperIdentity(k) for k in names])


def identity_mapper_from_module(module: nn.Module) -> ModelStateMapperParallel:
    """An identity mapper over every key of ``module.state_dict()`` (parameters and persistent buffers)."""
    return identity_mapper_from_keys(module.state_dict(keep_vars=True).keys())
