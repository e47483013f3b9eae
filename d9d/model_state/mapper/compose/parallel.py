"""Composition: independent mappers side by side."""

from collections.abc import Sequence

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup


class ModelStateMapperParallel(ModelStateMapper):
    """Runs independent mappers side by side; their groups are the union of the parts' groups."""

    def __init__(self, mappers: Sequence[ModelStateMapper]):
        """Args:
        mappers: The parts. No two may read the same key or produce the same key.

        Raises:
            ValueError: If two parts read or produce the same key; the message names the key.
        """
        self._owner: dict[StateGroup, ModelStateMapper] = {}
        self._by_inputs: dict[frozenset[str], tuple[ModelStateMapper, StateGroup]] = {}
        inputs: set[str] = set()
        outputs: set[str] = set()
        for mapper in mappers:
            for group in mapper.state_dependency_groups():
                for key in group.inputs:
                    if key in inputs:
                        raise ValueError(f"parallel mappers both read input key {key!r}")
                    inputs.add(key)
                for key in group.outputs:
                    if key in outputs:
                        raise ValueError(f"parallel mappers both produce output key {key!r}")
                    outputs.add(key)
                self._owner[group] = mapper
                self._by_inputs[group.inputs] = (mapper, group)
        self._mappers = list(mappers)

    @property
    def mappers(self) -> list[ModelStateMapper]:
        """The parts, in the order given."""
        return list(self._mappers)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(self._owner)

    def passthrough_sources(self, group: StateGroup) -> dict[str, str] | None:
        return self._owner[group].passthrough_sources(group)

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        part = self._by_inputs.get(frozenset(group))
        if part is None:
            raise KeyError(f"no parallel part declares a group with inputs {sorted(group)}")
        return part[0].apply(group)
