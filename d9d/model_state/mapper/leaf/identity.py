"""Leaf mapper: pass one key through unchanged."""

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup
from d9d.model_state.mapper.leaf.names import require_name


class ModelStateMapperIdentity(ModelStateMapper):
    """Passes one key through unchanged (compose many with :class:`ModelStateMapperParallel`, or build them with
    :func:`d9d.model_state.mapper.identity_mapper_from_keys`)."""

    def __init__(self, name: str):
        """Args:
        name: The key to pass through.

        Raises:
            TypeError: If ``name`` is not a ``str`` (a collection of keys is a parallel of identities).
        """
        self._name = require_name("ModelStateMapperIdentity", "name", name)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset([self._name]), outputs=frozenset([self._name]))])

    def passthrough_sources(self, group: StateGroup) -> dict[str, str]:
        return {k: k for k in group.outputs}

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._name: group[self._name]}
