"""Distributed training helpers: process-group setup, meta-device init and FSDP2 sharding of injected models."""

from d9d.parallel.fsdp import shard_model
from d9d.parallel.meta_init import init_empty_parameters, materialize_model
from d9d.parallel.process_group import barrier, find_free_port, init_distributed, is_main_rank

__all__ = [
    "barrier",
    "find_free_port",
    "init_distributed",
    "init_empty_parameters",
    "is_main_rank",
    "materialize_model",
    "shard_model",
]
