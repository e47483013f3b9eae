"""Leaf mapper: take the keys of one child module and drop its prefix (``model.layers.0.x -> x``)."""

from collections.abc import Iterable

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup
from d9d.model_state.mapper.leaf.names import require_name, require_names


class ModelStateMapperSelectChildModules(ModelStateMapper):
    """Reads ``<parent_name>.<name>`` for each name and produces ``<name>``: the state of one submodule, as that
    submodule's own state dict (one group per key)."""

    def __init__(self, base_names: Iterable[str], parent_name: str):
        """Args:
        base_names: The keys relative to the child module (``"weight"``, ``"mlp.up_proj.weight"``).
        parent_name: The child module's qualified name (``"model.layers.0"``).
        """
        self._names = require_names("ModelStateMapperSelectChildModules", "base_names", base_names)
        self._prefix = require_name("ModelStateMapperSelectChildModules", "parent_name", parent_name) + "."

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(
            StateGroup(inputs=frozenset([self._prefix + name]), outputs=frozenset([name])) for name in self._names
        )

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key.removeprefix(self._prefix): value for key, value in group.items()}
