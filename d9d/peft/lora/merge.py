"""Folding a LoRA update into a weight that may be a sharded DTensor."""

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from d9d.dtensor import full_tensor, local_part
from d9d.ops import lora_merge_


def merge_lora_weight_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``weight += scale * lora_B @ lora_A`` in place, shard-locally when ``weight`` is a DTensor.

    For ``weight`` sharded by rows (FSDP2's ``Shard(0)``), ``lora_B`` is sharded the same way (it has the same
    number of rows), so each rank updates its rows with its rows of ``B`` and the full ``A``: the only
    communication is gathering ``A`` (r x in); ``weight`` is never gathered.

    Raises:
        ValueError: If ``weight`` is a DTensor placed in a way this local computation does not cover.
    """
    if not isinstance(weight, DTensor):
        lora_merge_(weight, full_tensor(lora_A), full_tensor(lora_B), scale)
        return
    if any(not isinstance(p, Shard | Replicate) or (isinstance(p, Shard) and p.dim != 0) for p in weight.placements):
        raise ValueError(f"cannot merge LoRA into a weight placed as {weight.placements}; expected Shard(0)/Replicate")
    a_full = full_tensor(lora_A)
    same_layout = isinstance(lora_B, DTensor) and lora_B.device_mesh == weight.device_mesh
    if same_layout and lora_B.placements == weight.placements:
        b_local = lora_B.to_local()
    else:  # B is laid out differently from W: take W's rows of the full B (B is small: out x r)
        b_local = local_part(full_tensor(lora_B), weight)
    lora_merge_(weight.to_local(), a_full, b_local, scale)
