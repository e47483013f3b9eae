"""d9d.parallel.process_group: torchrun environment checks and the helpers that work without a process group."""

import socket

import pytest
import torch.distributed as dist

from d9d.parallel import barrier, find_free_port, init_distributed, is_main_rank, launch_world_size

pytestmark = pytest.mark.local


def test_init_distributed_needs_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        init_distributed()


def test_helpers_without_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    assert is_main_rank()
    barrier()  # a no-op, not an error


def test_launch_world_size_follows_torchrun_and_is_one_for_plain_python(monkeypatch: pytest.MonkeyPatch) -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # without RANK, torchrun did not launch this process
    assert launch_world_size() == 1
    monkeypatch.setenv("RANK", "3")
    assert launch_world_size() == 4
    for bad in ("", "0", "two"):
        monkeypatch.setenv("WORLD_SIZE", bad)
        with pytest.raises(ValueError, match=f"WORLD_SIZE .* positive integer, got {bad!r}"):
            launch_world_size()


def test_find_free_port_gives_a_bindable_port() -> None:
    port = find_free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
