"""Which part of a global tensor a rank holds, as runs of global indices per dimension, for any DTensor placement.

A DTensor's local tensor is the global tensor indexed, along each dimension, by the global indices this rank
keeps (sharding is separable per dimension). Those indices form a few contiguous runs (one for ``Shard``,
possibly several for ``_StridedShard``), and a rank's piece is the product of its runs: the blocks that a loader
reads with safetensors slices and that an export places into the full tensor.
"""

import itertools
import math
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement, _StridedShard

Run = tuple[int, int]
"""Global indices ``[start, stop)`` along one dimension."""

Runs = tuple[tuple[Run, ...], ...]
"""Per dimension, the runs of global indices a rank holds, in the order of its local tensor."""


def is_shard_like(placement: Placement) -> bool:
    """Whether ``placement`` splits a tensor dimension: ``Shard``, or FSDP-over-TP's ``_StridedShard``."""
    return isinstance(placement, Shard | _StridedShard)


def shards_dim(placement: Placement, dim: int, ndim: int) -> bool:
    """Whether ``placement`` splits tensor dimension ``dim``."""
    return is_shard_like(placement) and placement.dim % ndim == dim


def check_placements(key: str, t: DTensor) -> None:
    """Refuses placements whose local tensor is not a piece of the global one (``Partial``: a pending sum).

    Raises:
        ValueError: Naming ``key`` and its placements.
    """
    for p in t.placements:
        if not (isinstance(p, Replicate) or is_shard_like(p)):
            raise ValueError(f"{key!r} is placed as {t.placements}: only Shard, _StridedShard and Replicate "
                             "placements hold pieces of the tensor (reduce a Partial one first)")


def local_runs(t: DTensor) -> Runs:
    """The runs of global indices, per dimension, that this rank's local tensor of ``t`` holds.

    Computed by distributing one index vector per sharded dimension with ``t``'s placements on that dimension
    (others replicated): ``distribute_tensor(..., src_data_rank=None)`` cuts locally and communicates nothing,
    and it follows DTensor's own rules for uneven splits and ``_StridedShard``. Costs one small index vector per
    sharded dimension.
    """
    runs = []
    for dim, size in enumerate(t.shape):
        on_dim = [p if shards_dim(p, dim, t.ndim) else Replicate() for p in t.placements]
        if all(isinstance(p, Replicate) for p in on_dim):
            runs.append(((0, size),))
            continue
        shape = [1] * t.ndim
        shape[dim] = size
        index = torch.arange(size).view(shape)
        local = distribute_tensor(index, t.device_mesh, on_dim, src_data_rank=None).to_local()
        runs.append(as_runs(local.flatten().tolist()))
    return tuple(runs)


def local_indices(t: DTensor, dim: int) -> torch.Tensor:
    """The global indices along ``dim`` that this rank's local tensor of ``t`` holds, in local order (int64)."""
    runs = local_runs(t)[dim]
    return torch.cat([torch.arange(start, stop) for start, stop in runs]) if runs else torch.empty(0, dtype=torch.long)


def as_runs(indices: list[int]) -> tuple[Run, ...]:
    """Consecutive increasing indices grouped into ``[start, stop)`` runs, keeping their order."""
    runs: list[Run] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return tuple(runs)


def piece_shape(runs: Runs) -> tuple[int, ...]:
    """The local tensor's shape for these runs."""
    return tuple(sum(stop - start for start, stop in dim_runs) for dim_runs in runs)


def blocks(runs: Runs) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Each contiguous block of the piece: ``(global slices, local slices)``; one block unless runs split."""
    per_dim = []
    for dim_runs in runs:
        entries, offset = [], 0
        for start, stop in dim_runs:
            entries.append((slice(start, stop), slice(offset, offset + stop - start)))
            offset += stop - start
        per_dim.append(entries)
    for combo in itertools.product(*per_dim):
        yield tuple(g for g, _ in combo), tuple(local for _, local in combo)


def chunks(block: tuple[tuple[slice, ...], tuple[slice, ...]], itemsize: int,
           limit: int) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Splits a block ``(global slices, local slices)`` of a tensor of at least one dimension into parts of at
    most ``limit`` bytes (one element at least), each contiguous in a row-major tensor of the block's shape:
    slabs of the trailing dimensions, cut along the first dimension from which one slab fits."""
    shape = [s.stop - s.start for s in block[0]]
    dim = next((d for d in range(len(shape)) if math.prod(shape[d + 1:]) * itemsize <= limit), len(shape) - 1)
    step = max(1, limit // (math.prod(shape[dim + 1:]) * itemsize))
    for lead in itertools.product(*(range(n) for n in shape[:dim])):
        for start in range(0, shape[dim], step):
            cut = [*((i, i + 1) for i in lead), (start, min(start + step, shape[dim]))]
            yield tuple(tuple(slice(s.start + a, s.start + b) for s, (a, b) in zip(slices[:dim + 1], cut, strict=True))
                        + slices[dim + 1:] for slices in block)
