"""Leaf mappers between several tensors and one: stack / unstack (a new dimension), concatenate / chunk (an
existing one). Loading a per-expert checkpoint (``experts.{e}.gate_proj.weight``) into fused 3-D expert weights,
or separate q/k/v projections into a fused one, composes these."""

from collections.abc import Sequence

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup
from d9d.model_state.mapper.leaf.names import require_name, require_names


class _ManyToOne(ModelStateMapper):
    def __init__(self, source_names: Sequence[str], target_name: str, dim: int):
        mapper = type(self).__name__
        self._sources = require_names(mapper, "source_names", source_names)
        self._target = require_name(mapper, "target_name", target_name)
        self._dim = dim

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset(self._sources), outputs=frozenset([self._target]))])

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = [group[name] for name in self._sources]
        try:
            return {self._target: self._join(tensors).contiguous()}
        except (IndexError, RuntimeError) as e:
            shapes = {name: tuple(t.shape) for name, t in zip(self._sources, tensors, strict=True)}
            raise ValueError(f"{type(self).__name__}: cannot join {shapes} into {self._target!r} along dim "
                             f"{self._dim}: {e}") from e

    def _join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class _OneToMany(ModelStateMapper):
    def __init__(self, source_name: str, target_names: Sequence[str], dim: int):
        mapper = type(self).__name__
        self._source = require_name(mapper, "source_name", source_name)
        self._targets = require_names(mapper, "target_names", target_names)
        self._dim = dim

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset([self._source]), outputs=frozenset(self._targets))])

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensor = group[self._source]
        try:
            parts = self._split(tensor)
        except (IndexError, RuntimeError) as e:
            raise ValueError(f"{type(self).__name__}: cannot split {self._source!r} of shape {tuple(tensor.shape)} "
                             f"into {len(self._targets)} along dim {self._dim}: {e}") from e
        # Clones, not views: the parts must not keep the whole source alive, nor share storage with each other.
        return {name: part.contiguous().clone() for name, part in zip(self._targets, parts, strict=True)}

    def _split(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        raise NotImplementedError


class ModelStateMapperStackTensors(_ManyToOne):
    """Stacks equal-shaped tensors along a new dimension ``dim`` into one (per-expert weights -> a 3-D one)."""

    def __init__(self, source_names: Sequence[str], target_name: str, dim: int):
        """Args:
        source_names: The keys to stack, in order (index ``i`` along ``dim`` is ``source_names[i]``).
        target_name: The key of the stacked tensor.
        dim: The new dimension's position.
        """
        super().__init__(source_names, target_name, dim)

    def _join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors, dim=self._dim)


class ModelStateMapperConcatenateTensors(_ManyToOne):
    """Concatenates tensors along an existing dimension ``dim`` (``gate`` and ``up`` -> ``gate_up``)."""

    def __init__(self, source_names: Sequence[str], target_name: str, dim: int):
        """Args:
        source_names: The keys to concatenate, in order.
        target_name: The key of the concatenated tensor.
        dim: The dimension to concatenate along.
        """
        super().__init__(source_names, target_name, dim)

    def _join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=self._dim)


class ModelStateMapperUnstackTensors(_OneToMany):
    """Splits one tensor along ``dim`` into one tensor per index, removing ``dim`` (a 3-D expert weight -> one per
    expert); the size of ``dim`` must equal the number of targets."""

    def __init__(self, source_name: str, target_names: Sequence[str], dim: int):
        """Args:
        source_name: The key to unstack.
        target_names: One key per index along ``dim``, in order.
        dim: The dimension to remove.
        """
        super().__init__(source_name, target_names, dim)

    def _split(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        if tensor.shape[self._dim] != len(self._targets):
            raise RuntimeError(f"dimension {self._dim} has size {tensor.shape[self._dim]}")
        return torch.unbind(tensor, dim=self._dim)


class ModelStateMapperChunkTensors(_OneToMany):
    """Splits one tensor along ``dim`` into equal chunks, one per target (``gate_up`` -> ``gate`` and ``up``);
    the size of ``dim`` must divide evenly."""

    def __init__(self, source_name: str, target_names: Sequence[str], dim: int):
        """Args:
        source_name: The key to split.
        target_names: One key per chunk, in order.
        dim: The dimension to split along.
        """
        super().__init__(source_name, target_names, dim)

    def _split(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        size, count = tensor.shape[self._dim], len(self._targets)
        if size % count:
            raise RuntimeError(f"dimension {self._dim} has size {size}, not a multiple of {count}")
        return torch.split(tensor, size // count, dim=self._dim)
