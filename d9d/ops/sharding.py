"""DTensor sharding rules of the merge op, so ``W += s B A`` runs shard-locally on sharded weights."""

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from d9d.ops import _registration  # noqa: F401  (loads d9d._C, which defines the ops)


def _merge_sharding(weight, lora_A, lora_B, scale):
    # Rows of W pair with rows of B, columns of W with columns of A. Every rule keeps W where it is (the op mutates
    # it), so DTensor only ever moves the small A (r x in) or B (out x r): a merge never gathers a weight.
    return [
        ([], [Replicate(), Replicate(), Replicate(), None]),
        ([], [Shard(0), Replicate(), Shard(0), None]),  # FSDP2: W and B by rows, A gathered
        ([], [Shard(1), Shard(1), Replicate(), None]),  # column-wise tensor parallel: W and A by columns
    ]


register_sharding(torch.ops.d9d.lora_merge_.default)(_merge_sharding)
