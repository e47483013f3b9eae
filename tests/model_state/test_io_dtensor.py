"""DTensor mappers and I/O on an FSDP2-sharded model, in one process (a world of one, gloo)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from d9d.model_state.io import load_model_state, save_model_state
from d9d.model_state.mapper.adapters import identity_mapper_from_module
from d9d.model_state.mapper.compose import ModelStateMapperSequential
from d9d.model_state.mapper.leaf import ModelStateMapperDistribute, ModelStateMapperGatherFullTensor
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


def test_distribute_and_gather_round_trip(mesh: DeviceMesh) -> None:
    full = torch.randn(5, 4)
    dt = ModelStateMapperDistribute("w", mesh, [Shard(0)]).apply({"w": full})["w"]
    assert isinstance(dt, DTensor)
    assert dt.placements == (Shard(0),)
    assert dt.shape == full.shape
    gathered = ModelStateMapperGatherFullTensor(["w", "plain"]).apply({"w": dt, "plain": full})
    assert not isinstance(gathered["w"], DTensor)
    torch.testing.assert_close(gathered["w"], full)
    assert gathered["plain"] is full


def test_distribute_declares_one_group_per_key(mesh: DeviceMesh) -> None:
    mapper = ModelStateMapperDistribute(["a", "b"], mesh, [Replicate()])
    assert mapper.input_keys() == mapper.output_keys() == {"a", "b"}
    assert len(mapper.state_dependency_groups()) == 2
    with pytest.raises(ValueError, match="placement"):
        ModelStateMapperDistribute("a", mesh, [Shard(0), Shard(1)])
    with pytest.raises(TypeError, match="'a'"):
        mapper.apply({"a": mapper.apply({"a": torch.ones(2)})["a"]})


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


def test_load_accepts_a_mapper_that_distributes(mesh: DeviceMesh, tmp_path: Path) -> None:
    model = Net()
    save_model_state(tmp_path / "ckpt", None, model, show_progress=False)
    fresh = Net()
    shard_model(fresh, nn.Sequential, mesh=mesh)
    keys = list(fresh.state_dict())
    mapper = ModelStateMapperSequential([identity_mapper_from_module(fresh),
                                         ModelStateMapperDistribute(keys, mesh, [Shard(0)])])
    load_model_state(tmp_path / "ckpt", mapper, "cpu", fresh, show_progress=False)
    torch.testing.assert_close(fresh.out.weight.full_tensor(), model.out.weight)
