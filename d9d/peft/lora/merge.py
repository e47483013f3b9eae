"""Folding a LoRA or DoRA update into a weight that may be a sharded DTensor."""

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from d9d.dtensor import full_tensor, local_part
from d9d.ops import dora_merge_, dora_weight_norm, lora_merge_


def merge_lora_weight_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``weight += scale * lora_B @ lora_A`` in place; a sharded ``weight`` stays sharded and is never gathered.

    On DTensors the merge op's sharding rule (``d9d/ops/sharding.py``) does the work: for FSDP2's row sharding,
    ``lora_B`` is sharded like ``weight`` (same number of rows), so each rank updates its rows with its rows of
    ``B`` and the gathered ``A`` (r x in), the only communication.
    """
    if isinstance(weight, DTensor):
        if any(not (isinstance(p, Replicate) or (type(p) is Shard and p.dim in (0, 1))) for p in weight.placements):
            # DTensor would redistribute the weight to merge into a copy, and the update would be lost.
            raise ValueError(f"cannot merge LoRA into a weight placed as {weight.placements}; expected Shard(0), "
                             "Shard(1) or Replicate on each mesh dimension")
        lora_A, lora_B = _on_mesh_of(lora_A, weight), _on_mesh_of(lora_B, weight)
    lora_merge_(weight, lora_A, lora_B, scale)


def _on_mesh_of(t: torch.Tensor, weight: DTensor) -> torch.Tensor:
    """``t`` as a DTensor on ``weight``'s mesh (adapters that were not sharded with it are replicated: small)."""
    if isinstance(t, DTensor) and t.device_mesh == weight.device_mesh:
        return t
    replicate = [Replicate()] * weight.device_mesh.ndim
    return DTensor.from_local(full_tensor(t), weight.device_mesh, replicate, run_check=False)


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
