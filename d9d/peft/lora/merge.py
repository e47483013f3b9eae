"""Folding a LoRA or DoRA update into a weight that may be a sharded DTensor."""

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from d9d.dtensor import full_tensor, local_part
from d9d.model_state.io.pieces import is_shard_like, local_indices
from d9d.ops import dora_merge_, dora_weight_norm, lora_merge_


def merge_lora_weight_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``weight += scale * lora_B @ lora_A`` in place; a sharded ``weight`` stays sharded and is never gathered.

    For a DTensor ``weight``, each rank updates its local shard with the rows of ``B`` and the columns of ``A``
    that the shard covers. Which global rows and columns those are is found by laying out index vectors exactly
    as the weight is laid out, so every placement that sharding produces works: FSDP2's ``Shard(0)``, HSDP's
    ``(Replicate(), Shard(0))``, tensor parallelism's ``Shard(0)`` / ``Shard(1)``, and FSDP2 on top of tensor
    parallelism (``(_StridedShard(0), Shard(0))``), uneven shards included. The adapters (``r x in``, ``out x r``,
    small) are gathered whole; the only communication.

    Raises:
        ValueError: If ``weight`` is a DTensor with a placement other than a shard of dim 0 or 1 or a replica
            (a partial sum cannot take an update in place); the message names the placements.
    """
    if not isinstance(weight, DTensor):
        lora_merge_(weight, full_tensor(lora_A), full_tensor(lora_B), scale)
        return
    if any(not (isinstance(p, Replicate) or (is_shard_like(p) and p.dim in (0, 1))) for p in weight.placements):
        raise ValueError(f"cannot merge LoRA into a weight placed as {weight.placements}; expected shards of dim 0 "
                         "or 1, or replicas, on each mesh dimension")
    A, B = full_tensor(lora_A), full_tensor(lora_B)  # collectives: every rank gathers the same adapters
    local = weight.to_local()
    rows, cols = local_indices(weight, 0).to(local.device), local_indices(weight, 1).to(local.device)
    lora_merge_(local, A.to(local.device)[:, cols], B.to(local.device)[rows], scale)


def _row_local(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight``'s local rows, the full ``lora_A`` and the rows of ``lora_B`` that pair with the local rows.

    DoRA's row norms need whole rows of ``W + s B A``, so a weight may be split by rows (FSDP2's ``Shard(0)``) or
    replicated, not by columns. Only the small adapters are gathered.
    """
    if not isinstance(weight, DTensor):
        return weight, full_tensor(lora_A), full_tensor(lora_B)
    if any(not (isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0)) for p in weight.placements):
        raise ValueError(f"cannot {what} on a weight placed as {weight.placements}: DoRA's row norms need whole rows "
                         "(expected Shard(0) or Replicate on each mesh dimension)")
    return weight.to_local(), full_tensor(lora_A), local_part(full_tensor(lora_B), weight)


def _local_magnitude(magnitude: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The magnitude's entries of ``weight``'s local rows (a view that writes through for a matching DTensor)."""
    if isinstance(weight, DTensor):
        if not (isinstance(magnitude, DTensor) and magnitude.device_mesh == weight.device_mesh
                and magnitude.placements == weight.placements):
            raise ValueError(f"DoRA's magnitude must be sharded like its weight ({weight.placements}), got "
                             f"{getattr(magnitude, 'placements', 'a plain tensor')}")
        return magnitude.to_local()
    if isinstance(magnitude, DTensor):
        raise ValueError("DoRA's magnitude is sharded but its weight is not")
    return magnitude


@torch.no_grad()
def init_dora_magnitude_(magnitude: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scale: float) -> None:
    """``magnitude <- ||W + scale B A||_row`` in place, shard-locally on row-sharded weights (PEFT's DoRA init)."""
    local_weight, full_A, local_B = _row_local(weight, lora_A, lora_B, "initialize DoRA's magnitude")
    local_magnitude = _local_magnitude(magnitude, weight)
    local_magnitude.copy_(dora_weight_norm(local_weight, full_A.to(local_B.dtype), local_B, scale))


@torch.no_grad()
def merge_dora_weight_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                       scale: float) -> None:
    """``W <- m / ||W + scale B A|| * (W + scale B A)`` in place; a row-sharded weight stays sharded, never gathered."""
    local_weight, full_A, local_B = _row_local(weight, lora_A, lora_B, "merge DoRA")
    dora_merge_(local_weight, full_A, local_B, _local_magnitude(magnitude, weight), scale)
