"""The job's session in one process: it owns its process group and leaves the environment alone."""

import os

import pytest
import torch.distributed as dist

from d9d.finetune.session import RunFailedError, distributed_session

pytestmark = pytest.mark.local


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_torchrun_env")
def test_a_session_of_one_creates_and_destroys_its_group_without_touching_the_environment():
    env = dict(os.environ)
    with distributed_session(timeout_s=30) as session:
        assert dist.is_initialized()
        assert (session.rank, session.world, session.main) == (0, 1, True)
        dist.barrier()
    assert not dist.is_initialized()
    assert dict(os.environ) == env


@pytest.mark.usefixtures("no_torchrun_env")
def test_a_d9d_error_becomes_one_message_and_the_group_is_still_destroyed():
    with pytest.raises(RunFailedError, match="bad pattern") as info, distributed_session(timeout_s=30):
        raise ValueError("bad pattern")
    assert info.value.print_here
    assert info.value.message == "bad pattern"
    assert not dist.is_initialized()


@pytest.mark.usefixtures("no_torchrun_env")
def test_other_errors_keep_their_traceback():
    with pytest.raises(KeyError, match="x"), distributed_session(timeout_s=30):
        raise KeyError("x")
    assert not dist.is_initialized()
