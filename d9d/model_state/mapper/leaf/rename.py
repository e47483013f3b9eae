"""Leaf mapper: rename keys."""

from collections.abc import Mapping

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup


class ModelStateMapperRename(ModelStateMapper):
    """Renames keys (``old -> new``), one group per key."""

    def __init__(self, renames: Mapping[str, str]):
        """Args:
        renames: Maps each source key to its destination key. Destinations must be distinct.

        Raises:
            ValueError: If two source keys map to the same destination key.
        """
        seen: dict[str, str] = {}
        for src, dst in renames.items():
            if dst in seen:
                raise ValueError(f"rename maps both {seen[dst]!r} and {src!r} to {dst!r}")
            seen[dst] = src
        self._renames = dict(renames)

    @property
    def renames(self) -> dict[str, str]:
        """A copy of the ``old -> new`` mapping."""
        return dict(self._renames)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(
            StateGroup(inputs=frozenset([src]), outputs=frozenset([dst])) for src, dst in self._renames.items()
        )

    def passthrough_sources(self, group: StateGroup) -> dict[str, str]:
        return {self._renames[k]: k for k in group.inputs}

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._renames[k]: v for k, v in group.items()}
