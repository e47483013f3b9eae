"""d9d.parallel.fsdp: block selection, without a process group (the sharding itself runs in tests/distributed)."""

import pytest
from torch import nn

from d9d.parallel import shard_model
from tests.tiny_llama import TinyLlama

pytestmark = pytest.mark.local


def test_shard_model_needs_a_block() -> None:
    with pytest.raises(ValueError, match="no submodule"):
        shard_model(TinyLlama(), nn.GRU)
    with pytest.raises(TypeError, match="module classes or a predicate"):
        shard_model(TinyLlama(), ["Block"])
