"""Process-group setup for scripts and tests launched by ``torchrun``, and the rank-0 / barrier helpers."""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def init_distributed(timeout: timedelta = timedelta(minutes=10)) -> DeviceMesh:
    """Initializes the default process group from ``torchrun``'s environment and returns a 1-D mesh over all ranks.

    The backend follows the hardware: NCCL with one GPU per local rank when CUDA is available, gloo on the CPU.
    Already-initialized process groups are reused. The timeout bounds every collective, so a rank that dies or
    diverges makes the others fail instead of hanging forever (tests use a short one). For HSDP or tensor
    parallelism, :func:`d9d.parallel.init_parallel` builds the named ``(dp_replicate, dp_shard, tp)`` mesh instead.

    Args:
        timeout: How long a collective may wait for the other ranks.

    Raises:
        RuntimeError: If the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...) is missing.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"init_distributed needs the torchrun environment; missing variable(s) {missing}")
    if torch.cuda.is_available():
        device_type = "cuda"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device_type = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return init_device_mesh(device_type, (dist.get_world_size(),))


def launch_world_size() -> int:
    """The world size this process runs in, known before any process group: the group's once there is one, torchrun's
    ``WORLD_SIZE`` where torchrun launched it (``RANK`` set), else 1 (a plain ``python`` run is a world of one).

    Raises:
        ValueError: If torchrun's ``WORLD_SIZE`` is not a positive integer.
    """
    if dist.is_initialized():
        return dist.get_world_size()
    if "RANK" not in os.environ:
        return 1
    value = os.environ.get("WORLD_SIZE", "")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE (set by torchrun, with RANK) must be a positive integer, got {value!r}")
    return int(value)


def is_main_rank() -> bool:
    """True on rank 0, and in a process that is not part of a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Waits for every rank of the default process group; a no-op in a process that is not part of one."""
    if dist.is_initialized():
        dist.barrier()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (for ``MASTER_PORT`` of a local launch).

    The port is released before returning, so another process may take it first; local launchers accept that race.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
