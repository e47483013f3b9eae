"""Worker for ``test_merge_sharding.py``: the merge ops on DTensors, two ranks, every weight placement."""

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from d9d.ops import lora_merge_
from d9d.peft.lora.merge import merge_lora_weight_

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
W, A, B = torch.randn(9, 6), torch.randn(3, 6), torch.randn(9, 3)  # 9 rows: uneven shards
expected = W + 0.5 * B @ A
cases = [
    ("fsdp2 rows", [Shard(0)], [Shard(0)], [Shard(0)]),
    ("replicated", [Replicate()], [Shard(0)], [Shard(0)]),
    ("tp columns", [Shard(1)], [Shard(0)], [Shard(0)]),
    ("plain adapters", [Shard(0)], None, None),
]
for name, wp, ap, bp in cases:
    weight = distribute_tensor(W.clone(), mesh, wp)
    storage = weight.to_local().data_ptr()
    a = distribute_tensor(A, mesh, ap) if ap else A
    b = distribute_tensor(B, mesh, bp) if bp else B
    merge_lora_weight_(weight, a, b, 0.5)
    assert weight.placements == tuple(wp), (name, weight.placements)
    assert weight.to_local().data_ptr() == storage, f"{name}: the merge must update the shard in place"
    torch.testing.assert_close(weight.full_tensor(), expected, msg=name)
    # The op straight on DTensors (no plain adapters there), with -s: the merge undone shard by shard.
    lora_merge_(weight, a if ap else distribute_tensor(A, mesh, [Replicate()]),
                b if bp else distribute_tensor(B, mesh, [Replicate()]), -0.5)
    torch.testing.assert_close(weight.full_tensor(), W, msg=f"{name}: merge with -s")
print(f"rank {dist.get_rank()}: merge sharding ok", flush=True)
# Without this barrier, one rank's teardown while the other's last all-gather still ran aborted the process
# ("terminate called without an active exception") in 3 of 12 runs here; 0 of 12 with it.
dist.barrier()
dist.destroy_process_group()
