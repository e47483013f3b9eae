"""Leaf mapper: one stored tensor fills several keys (a checkpoint that stores tied weights once)."""

from collections.abc import Iterable

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup


class ModelStateMapperDuplicate(ModelStateMapper):
    """Produces ``source`` and each of its copies from the one tensor ``source``, in one group.

    The copies are clones, so that the receiving parameters never share storage (they train apart once untied).
    """

    def __init__(self, source: str, copies: Iterable[str]):
        """Declares the duplication.

        Args:
            source: The stored key; it is passed through.
            copies: Keys that receive a clone of it.

        Raises:
            ValueError: If ``copies`` is empty or names ``source`` or a key twice.
        """
        copies = list(copies)
        if not copies:
            raise ValueError(f"ModelStateMapperDuplicate: no copies of {source!r} given")
        if source in copies or len(set(copies)) != len(copies):
            raise ValueError(f"ModelStateMapperDuplicate: copies {copies} of {source!r} repeat a key")
        self._source = source
        self._copies = copies

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        outputs = frozenset([self._source, *self._copies])
        return frozenset([StateGroup(inputs=frozenset([self._source]), outputs=outputs)])

    def passthrough_sources(self, group: StateGroup) -> dict[str, str]:
        return dict.fromkeys(group.outputs, self._source)

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensor = group[self._source]
        return {self._source: tensor, **{k: tensor.clone() for k in self._copies}}
