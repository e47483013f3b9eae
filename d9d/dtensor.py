"""Moving between full tensors and DTensor shards, locally where possible."""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered (a collective: every rank of the mesh must call it) for a DTensor, else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's part of ``full`` laid out as ``like``, cut locally (no communication: every rank has ``full``)."""
    return distribute_tensor(full.to(like.to_local().device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def is_meta(t: torch.Tensor) -> bool:
    """Whether ``t`` (or, for a DTensor, its local shard) has no storage yet."""
    return (t.to_local() if isinstance(t, DTensor) else t).is_meta
