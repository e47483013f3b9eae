"""The merge ops' DTensor sharding rules under torchrun: shard-local, in place, for every weight placement."""

from pathlib import Path

import pytest

from tests.torchrun import torchrun

pytestmark = pytest.mark.distributed


def test_merge_ops_on_dtensors_two_ranks():
    proc = torchrun([str(Path(__file__).with_name("merge_sharding_worker.py"))], timeout_s=120)
    assert proc.stdout.count("merge sharding ok") == 2
