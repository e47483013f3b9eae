"""Folding a LoRA update into a weight that may be a sharded DTensor."""

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from d9d.dtensor import full_tensor
from d9d.ops import lora_merge_


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
