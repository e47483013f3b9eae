"""I/O on an FSDP2-sharded model, in one process (a world of one, gloo)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from d9d.model_state.io import load_model_state, save_model_state
from d9d.model_state.mapper import StateGroup
from d9d.model_state.mapper.adapters import identity_mapper_from_module
from d9d.model_state.mapper.compose import ModelStateMapperParallel
from d9d.model_state.mapper.leaf import ModelStateMapperIdentity
from d9d.parallel import find_free_port, shard_model

pytestmark = pytest.mark.local


@pytest.fixture(scope="module")
def mesh() -> Iterator[DeviceMesh]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3))
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_sharded_model_save_then_load(mesh: DeviceMesh, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    reference = Net()
    reference.load_state_dict(model.state_dict())
    shard_model(model, lambda name, _: name.startswith("blocks."), mesh=mesh)
    assert isinstance(model.blocks[0][0].weight, DTensor)
    save_model_state(tmp_path / "ckpt", None, model, shard_size_gb=200e-9, show_progress=False)

    fresh = Net()
    shard_model(fresh, nn.Sequential, mesh=mesh)
    load_model_state(tmp_path / "ckpt", identity_mapper_from_module(fresh), "cpu", fresh, show_progress=False)
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh(x), reference(x))


def test_load_reads_only_the_local_shard_and_refuses_a_dtensor_from_the_mapper(mesh: DeviceMesh,
                                                                              tmp_path: Path) -> None:
    model = Net()
    save_model_state(tmp_path / "ckpt", None, model, show_progress=False)
    fresh = Net()
    shard_model(fresh, nn.Sequential, mesh=mesh)
    stats = load_model_state(tmp_path / "ckpt", identity_mapper_from_module(fresh), "cpu", fresh,
                             show_progress=False)
    assert stats.bytes_read == stats.checkpoint_bytes  # a world of one keeps everything
    assert stats.sliced_tensors == len(fresh.state_dict())
    torch.testing.assert_close(fresh.out.weight.full_tensor(), model.out.weight)

    class Distributing(ModelStateMapperIdentity):
        def passthrough_sources(self, group: StateGroup) -> None:
            return None

        def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in group.items()}

    distributing = ModelStateMapperParallel([Distributing(k) for k in fresh.state_dict()])
    with pytest.raises(TypeError, match="produced a DTensor"):
        load_model_state(tmp_path / "ckpt", distributing, "cpu", fresh, show_progress=False)
