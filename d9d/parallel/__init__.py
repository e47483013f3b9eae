"""Distributed training helpers: process-group setup, the named device mesh, meta-device init, FSDP2 sharding and
tensor parallelism of injected models."""

from d9d.parallel.fsdp import shard_model
from d9d.parallel.mesh import MESH_DIMS, ParallelDims, ParallelMesh, check_tensor_parallel, init_parallel
from d9d.parallel.meta_init import init_empty_parameters, materialize_model
from d9d.parallel.process_group import barrier, find_free_port, init_distributed, is_main_rank, launch_world_size
from d9d.parallel.tensor_parallel import (
    LoRAColwiseParallel,
    LoRARowwiseParallel,
    apply_tensor_parallel,
    tensor_parallel_plan,
)

__all__ = [
    "MESH_DIMS",
    "LoRAColwiseParallel",
    "LoRARowwiseParallel",
    "ParallelDims",
    "ParallelMesh",
    "apply_tensor_parallel",
    "barrier",
    "check_tensor_parallel",
    "find_free_port",
    "init_distributed",
    "init_empty_parameters",
    "init_parallel",
    "is_main_rank",
    "launch_world_size",
    "materialize_model",
    "shard_model",
    "tensor_parallel_plan",
]
