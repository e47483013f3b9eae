"""The one place that names the device-mesh dims (``dp_replicate``, ``dp_shard``, ``tp``) and derives sub-meshes."""

import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from d9d.parallel.process_group import init_distributed

__all__ = ["MESH_DIMS", "ParallelDims", "ParallelMesh", "check_tensor_parallel", "init_parallel"]

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks split into data-parallel replicas, data-parallel shards and tensor-parallel ranks.

    ``dp_shard = world_size / (dp_replicate * tp)``. Ranks are laid out with ``tp`` innermost (the ranks of one
    tensor-parallel group are consecutive, so on a multi-GPU node they share the node's fast links), then
    ``dp_shard``, then ``dp_replicate`` outermost: with ``dp_replicate`` = number of nodes, the frozen weights are
    sharded within a node and only gradients of what trains cross nodes (HSDP).

    Attributes:
        world_size: Ranks in the job.
        dp_replicate: Data-parallel replicas (HSDP's replicate dim); 1 shards over every data-parallel rank.
        tp: Tensor-parallel ranks per model replica; 1 turns tensor parallelism off.
    """

    world_size: int
    dp_replicate: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "dp_replicate", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.world_size % (self.dp_replicate * self.tp):
            raise ValueError(
                f"parallel.dp_replicate ({self.dp_replicate}) x parallel.tp ({self.tp}) = "
                f"{self.dp_replicate * self.tp} must divide the world size {self.world_size}"
            )

    @property
    def dp_shard(self) -> int:
        """Ranks that shard one data-parallel replica (FSDP's shard dim)."""
        return self.world_size // (self.dp_replicate * self.tp)

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks in all: how many different batches a step processes."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, int, int]:
        """The mesh shape, in the order of :data:`MESH_DIMS`."""
        return (self.dp_replicate, self.dp_shard, self.tp)

    def build_mesh(self, device_type: str) -> "ParallelMesh":
        """The named mesh over the default process group (every rank must call it).

        Raises:
            ValueError: If the process group's world size is not ``world_size``.
        """
        actual = dist.get_world_size()
        if actual != self.world_size:
            raise ValueError(f"ParallelDims was built for world size {self.world_size}; the job has {actual}")
        return ParallelMesh(self, init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS))


@dataclasses.dataclass(frozen=True)
class ParallelMesh:
    """The 3-D mesh ``(dp_replicate, dp_shard, tp)`` and the sub-meshes that sharding and data loading use.

    Attributes:
        dims: The sizes.
        world: The whole mesh, dims named as in :data:`MESH_DIMS`.
    """

    dims: ParallelDims
    world: DeviceMesh

    @property
    def dp(self) -> DeviceMesh:
        """The mesh for ``fully_shard``: ``(dp_replicate, dp_shard)`` (HSDP) when replicated, else ``(dp_shard,)``.

        A 1-D mesh when ``dp_replicate`` is 1 keeps FSDP2's plain ``Shard(0)`` layout (no size-1 replicate dim).
        """
        return self.world["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.world["dp_shard"]

    @property
    def tp(self) -> DeviceMesh:
        """The tensor-parallel mesh of this rank's model replica."""
        return self.world["tp"]

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index in ``[0, dp_size)``: ranks of one tensor-parallel group share it (and
        so the batch and the dropout seed)."""
        replica, shard, _ = self.world.get_coordinate()
        return replica * self.dims.dp_shard + shard

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size


def init_parallel(dp_replicate: int = 1, tp: int = 1,
                  timeout: timedelta = timedelta(minutes=10)) -> ParallelMesh:
    """Initializes the process group (see :func:`d9d.parallel.init_distributed`) and builds the named mesh.

    Args:
        dp_replicate: Data-parallel replicas; for multi-node runs, the number of nodes.
        tp: Tensor-parallel ranks per replica.
        timeout: How long a collective may wait for the other ranks.

    Raises:
        ValueError: If ``dp_replicate * tp`` does not divide the world size (checked before any mesh is built).
        RuntimeError: If the ``torchrun`` environment is missing.
    """
    init_distributed(timeout=timeout)
    dims = ParallelDims(dist.get_world_size(), dp_replicate=dp_replicate, tp=tp)
    return dims.build_mesh("cuda" if torch.cuda.is_available() else "cpu")


def check_tensor_parallel(config: object, tp: int) -> None:
    """Checks that ``tp`` ranks can split a Hugging Face-style model config's heads and MLP evenly.

    Reads ``num_attention_heads``, ``num_key_value_heads`` (defaults to the attention heads when absent) and
    ``intermediate_size``; attributes a config lacks are not checked.

    Raises:
        ValueError: If ``tp`` does not divide one of them; the message names the field and both numbers.
    """
    if tp == 1:
        return
    fields = {"num_attention_heads": getattr(config, "num_attention_heads", None),
              "intermediate_size": getattr(config, "intermediate_size", None)}
    fields["num_key_value_heads"] = getattr(config, "num_key_value_heads", None) or fields["num_attention_heads"]
    bad = [f"{name}={value}" for name, value in fields.items() if isinstance(value, int) and value % tp]
    if bad:
        raise ValueError(f"parallel.tp={tp} must divide the model's {', '.join(bad)} (tensor parallelism splits "
                         "heads and the MLP evenly over the tp ranks)")
