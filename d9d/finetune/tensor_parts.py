"""Tensors saved as per-rank parts (safetensors) and read back into any sharding, without pickle.

Each rank writes only the part of a tensor it holds: its shard of a ``DTensor`` (with the shard's global offset;
replicas are written once), or its own copy of a plain tensor (in a sharded model only small optimizer scalars are
plain, such as Adam's step). A reader fills its own part of a tensor from the parts that overlap it, so a rank
reads only what it needs: with the same sharding as at save time, only its own file.
"""

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


@dataclasses.dataclass(frozen=True)
class Part:
    """Where one rank's part of a tensor sits in the whole tensor.

    Attributes:
        rank: The rank that wrote it (it is in that rank's file).
        offset: Global index of the part's first element along every dimension.
        shape: The part's shape.
    """

    rank: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> list:
        return [self.rank, list(self.offset), list(self.shape)]

    @classmethod
    def from_json(cls, value: list) -> "Part":
        rank, offset, shape = value
        return cls(int(rank), tuple(int(i) for i in offset), tuple(int(i) for i in shape))


def local_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's part of ``t`` and its global offset (the whole tensor at offset 0 for a plain tensor)."""
    if not isinstance(t, DTensor):
        return t, (0,) * t.dim()
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"cannot save a DTensor with a partial placement {t.placements}; reduce it first")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(offset)


def writes_part(t: torch.Tensor) -> bool:
    """Whether this rank saves its part of ``t``: every rank its plain tensors, one rank per DTensor replica."""
    if not isinstance(t, DTensor):
        return True
    coordinate = t.device_mesh.get_coordinate() or []
    return all(c == 0 for c, p in zip(coordinate, t.placements, strict=False) if p.is_replicate())


def _overlap(a_off, a_shape, b_off, b_shape) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """The slices of the overlap of boxes a and b, relative to a and to b; None if they do not overlap."""
    rel_a, rel_b = [], []
    for ao, an, bo, bn in zip(a_off, a_shape, b_off, b_shape, strict=False):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if lo >= hi:
            return None
        rel_a.append(slice(lo - ao, hi - ao))
        rel_b.append(slice(lo - bo, hi - bo))
    return tuple(rel_a), tuple(rel_b)


class PartReader:
    """Fills tensors (plain or sharded) from the parts that per-rank safetensors files hold.

    Files are opened lazily (headers only until a slice is read), so a rank touches only the files whose parts
    overlap its own.
    """

    def __init__(self, files: dict[int, Path], parts: dict[str, list[Part]], rank: int):
        """Args:
        files: The file of each writing rank.
        parts: For every tensor key, the parts the files hold.
        rank: The reading rank: where several ranks saved the same part, its own copy is read.
        """
        self._files = files
        self._parts = parts
        self._rank = rank
        self._open: dict[int, object] = {}

    def _file(self, rank: int):
        if rank not in self._open:
            self._open[rank] = safe_open(str(self._files[rank]), framework="pt")
        return self._open[rank]

    @torch.no_grad()
    def fill(self, key: str, target: torch.Tensor) -> None:
        """Copies ``key`` into ``target``'s local part (cast to its dtype).

        Raises:
            ValueError: If the saved parts do not cover the local part exactly; the message names the key.
        """
        local, offset = local_view(target)
        covered, seen = 0, set()
        for part in sorted(self._parts.get(key, []), key=lambda p: p.rank != self._rank):  # own copies first
            both = _overlap(offset, tuple(local.shape), part.offset, part.shape)
            if both is None or (part.offset, part.shape) in seen:
                continue
            seen.add((part.offset, part.shape))
            into_local, into_part = both
            whole = all(s.start == 0 and s.stop == n for s, n in zip(into_part, part.shape, strict=False))
            file = self._file(part.rank)
            piece = file.get_tensor(key) if whole else file.get_slice(key)[into_part]
            local[into_local].copy_(piece)
            covered += piece.numel()
        if covered != local.numel():
            raise ValueError(f"the saved parts of {key!r} cover {covered} of the {local.numel()} elements this rank "
                             "needs (the checkpoint is incomplete)")
