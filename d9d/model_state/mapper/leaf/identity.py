"""Leaf mapper: pass keys through unchanged."""

from collections.abc import Iterable

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup


class ModelStateMapperIdentity(ModelStateMapper):
    """Passes each of the given keys through unchanged, one group per key."""

    def __init__(self, keys: Iterable[str]):
        """Args:
        keys: The keys to pass through.
        """
        self._keys = frozenset(keys)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(StateGroup(inputs=frozenset([k]), outputs=frozenset([k])) for k in self._keys)

    def passthrough_sources(self, group: StateGroup) -> dict[str, str]:
        return {k: k for k in group.outputs}

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(group)
