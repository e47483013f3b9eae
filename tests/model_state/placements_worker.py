"""Worker run by ``torchrun`` from ``test_io_placements.py``: load a checkpoint into a model laid out one way
(1-D FSDP, HSDP, TP by hand, TP x FSDP), record what each rank read and holds, then export it.

Usage: ``placements_worker.py WORKDIR LAYOUT [LAYOUT ...]`` (one after another in the same processes). Reads
``WORKDIR/ckpt``; writes ``WORKDIR/LAYOUT-wsN/``.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import d9d.model_state.io.save as save_module
from d9d.dtensor import local_part
from d9d.model_state.io import load_model_state, save_model_state
from d9d.model_state.mapper import ModelStateMapper, StateGroup, identity_mapper_from_keys
from d9d.model_state.mapper.compose import ModelStateMapperParallel
from d9d.model_state.mapper.leaf import ModelStateMapperRename

FUSED = "layers.0.up.weight"
FUSED_PARTS = ("fused_a", "fused_b")  # the checkpoint stores layers.0.up.weight as two halves of its rows
RENAMED = {"head_weight_renamed": "head.weight"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)  # 10 rows over 4 ranks: an uneven split
        self.down = nn.Linear(10, 6)
        self.norm = nn.Parameter(torch.ones(6))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(6, 5, bias=False)


class ConcatRows(ModelStateMapper):
    """A group that computes its output (so the loader reads its inputs whole)."""

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset(FUSED_PARTS), outputs=frozenset([FUSED]))])

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {FUSED: torch.cat([group[k] for k in FUSED_PARTS])}


def checkpoint_mapper(model: nn.Module) -> ModelStateMapper:
    rest = set(model.state_dict()) - {FUSED, *RENAMED.values()}
    return ModelStateMapperParallel([ConcatRows(), ModelStateMapperRename(RENAMED), identity_mapper_from_keys(rest)])


def lay_out(model: Net, layout: str) -> None:
    """Places ``model``'s parameters as ``layout`` does."""
    world = dist.get_world_size()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout in ("tp", "tp_fsdp"):
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        tp = mesh["tp"]
        for block in model.layers:  # column-wise up (weight and bias by rows), row-wise down (weight by columns)
            block.up.weight = nn.Parameter(distribute_tensor(block.up.weight.detach(), tp, [Shard(0)]))
            block.up.bias = nn.Parameter(distribute_tensor(block.up.bias.detach(), tp, [Shard(0)]))
            block.down.weight = nn.Parameter(distribute_tensor(block.down.weight.detach(), tp, [Shard(1)]))
        model.head.weight = nn.Parameter(distribute_tensor(model.head.weight.detach(), tp, [Shard(0)]))
        if layout == "tp_fsdp":
            for block in model.layers:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
    else:
        raise ValueError(layout)


def run_layout(work: Path, layout: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = work / f"{layout}-ws{world}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Net()
    lay_out(model, layout)
    with torch.no_grad():  # not the checkpoint's values, so a missed copy shows
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).fill_(float("nan"))
    stats = load_model_state(work / "ckpt", checkpoint_mapper(model), "cpu", model, show_progress=False)

    # What this rank should have read: the local shard of every pass-through tensor, the fused parts whole.
    state = model.state_dict()
    expected_read = sum(v.to_local().numel() * 4 if isinstance(v, DTensor) else v.numel() * 4
                        for k, v in state.items() if k != FUSED) + state[FUSED].numel() * 4
    reference = torch.load(work / "reference.pt")
    wrong = []
    for key, value in state.items():
        if isinstance(value, DTensor):
            if not torch.equal(value.to_local(), local_part(reference[key], value)):
                wrong.append(key)
        elif not torch.equal(value, reference[key]):
            wrong.append(key)
    facts = {"bytes_read": stats.bytes_read, "expected_read": expected_read,
             "checkpoint_bytes": stats.checkpoint_bytes, "sliced": stats.sliced_tensors,
             "whole": stats.whole_tensors, "wrong": wrong,
             "placements": {k: str(v.placements) for k, v in state.items() if isinstance(v, DTensor)}}

    # Export: never full_tensor(), never a lone send/recv; record which rank wrote which file.
    def refuse(*args, **kwargs):
        raise AssertionError("the export called full_tensor() or a lone send/recv")

    written = []

    def recording_save(tensors, path, *args, **kwargs):
        written.append(Path(path).name)
        return original_save(tensors, path, *args, **kwargs)

    saved = DTensor.full_tensor, dist.send, dist.recv, save_module.save_file, save_module._CHUNK_BYTES
    original_save = save_module.save_file
    DTensor.full_tensor, dist.send, dist.recv, save_module.save_file = refuse, refuse, refuse, recording_save
    save_module._CHUNK_BYTES = 16  # column pieces go in several chunks of a row or less, over several rounds
    try:
        save_model_state(out / "export", None, model, shard_size_gb=100e-9, show_progress=False)
    finally:
        DTensor.full_tensor, dist.send, dist.recv, save_module.save_file, save_module._CHUNK_BYTES = saved
    facts["written"] = written
    (out / f"facts{rank}.json").write_text(json.dumps(facts))


def main() -> None:
    work, layouts = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        for layout in layouts:
            run_layout(work, layout)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
