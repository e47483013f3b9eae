"""Leaf mappers that reshape one tensor in place of its key: transpose, squeeze, unsqueeze."""

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup
from d9d.model_state.mapper.leaf.names import require_name


class _SingleTensorMapper(ModelStateMapper):
    """One key in, the same key out, through one tensor function."""

    def __init__(self, name: str):
        self._name = require_name(type(self).__name__, "name", name)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset([self._name]), outputs=frozenset([self._name]))])

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensor = group[self._name]
        try:
            return {self._name: self._transform(tensor)}
        except (IndexError, RuntimeError) as e:
            raise ValueError(f"{type(self).__name__}: cannot transform {self._name!r} of shape "
                             f"{tuple(tensor.shape)}: {e}") from e

    def _transform(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModelStateMapperTranspose(_SingleTensorMapper):
    """Swaps two dimensions of one tensor (``[out, in] -> [in, out]``, say); the result is contiguous."""

    def __init__(self, name: str, dims: tuple[int, int]):
        """Args:
        name: The key of the tensor.
        dims: The two dimensions to swap.
        """
        super().__init__(name)
        self._dims = tuple(dims)
        if len(self._dims) != 2:
            raise ValueError(f"ModelStateMapperTranspose: dims must name two dimensions, got {dims!r}")

    def _transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(*self._dims).contiguous()


class ModelStateMapperSqueeze(_SingleTensorMapper):
    """Removes one size-1 dimension of one tensor."""

    def __init__(self, name: str, dim: int):
        """Args:
        name: The key of the tensor.
        dim: The dimension to remove; it must have size 1.
        """
        super().__init__(name)
        self._dim = dim

    def _transform(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[self._dim] != 1:
            raise RuntimeError(f"dimension {self._dim} has size {tensor.shape[self._dim]}, not 1")
        return tensor.squeeze(self._dim)


class ModelStateMapperUnsqueeze(_SingleTensorMapper):
    """Inserts one size-1 dimension into one tensor."""

    def __init__(self, name: str, dim: int):
        """Args:
        name: The key of the tensor.
        dim: Where the new dimension goes (as in ``torch.unsqueeze``).
        """
        super().__init__(name)
        self._dim = dim

    def _transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(self._dim)
