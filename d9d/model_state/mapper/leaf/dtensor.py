"""Leaf mappers between full tensors and DTensors (for sharded models)."""

from collections.abc import Iterable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

from d9d.dtensor import full_tensor
from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup


def _as_keys(keys: str | Iterable[str]) -> frozenset[str]:
    return frozenset([keys]) if isinstance(keys, str) else frozenset(keys)


class ModelStateMapperDistribute(ModelStateMapper):
    """Turns each full tensor into a DTensor on ``mesh`` with ``placements``; each rank keeps only its shard.

    Every rank is expected to hold the same full tensor (every rank read the same checkpoint), so the shard is cut
    locally and nothing is communicated (``distribute_tensor(..., src_data_rank=None)``). The full tensor can be
    freed as soon as the group is applied, which is what lets a loader stream a checkpoint into a sharded model.
    """

    def __init__(self, keys: str | Iterable[str], mesh: DeviceMesh, placements: Sequence[Placement]):
        """Args:
        keys: The key or keys to distribute (one group per key).
        mesh: The device mesh of the produced DTensors.
        placements: One placement per mesh dimension, e.g. ``[Shard(0)]`` as FSDP2 lays out parameters.

        Raises:
            ValueError: If the number of placements differs from the mesh's number of dimensions.
        """
        if len(placements) != mesh.ndim:
            raise ValueError(f"{len(placements)} placement(s) {list(placements)} for a {mesh.ndim}-D mesh")
        self._keys = _as_keys(keys)
        self._mesh = mesh
        self._placements = tuple(placements)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(StateGroup(inputs=frozenset([k]), outputs=frozenset([k])) for k in self._keys)

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = {}
        for key, tensor in group.items():
            if isinstance(tensor, DTensor):
                raise TypeError(f"ModelStateMapperDistribute: {key!r} is already a DTensor")
            if tensor.device.type not in (self._mesh.device_type, "meta"):  # meta: a dry run
                tensor = tensor.to(self._mesh.device_type)
            result[key] = distribute_tensor(tensor, self._mesh, self._placements, src_data_rank=None)
        return result


class ModelStateMapperGatherFullTensor(ModelStateMapper):
    """Turns each DTensor into the full tensor (a collective: every rank of the mesh must apply the same groups in
    the same order); plain tensors pass through unchanged."""

    def __init__(self, keys: str | Iterable[str]):
        """Args:
        keys: The key or keys to gather (one group per key).
        """
        self._keys = _as_keys(keys)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(StateGroup(inputs=frozenset([k]), outputs=frozenset([k])) for k in self._keys)

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: full_tensor(v) for k, v in group.items()}
