"""d9d.parallel.mesh: the sizes of the named mesh and the checks that name the offending field."""

import re

import pytest
from transformers import LlamaConfig, Qwen2Config

from d9d.parallel import MESH_DIMS, ParallelDims, check_tensor_parallel

pytestmark = pytest.mark.local


@pytest.mark.parametrize(("world", "replicate", "tp", "shard"), [(1, 1, 1, 1), (4, 2, 1, 2), (4, 1, 2, 2),
                                                                 (4, 2, 2, 1), (8, 2, 2, 2), (6, 3, 1, 2)])
def test_dp_shard_is_what_replicas_and_tp_leave(world: int, replicate: int, tp: int, shard: int) -> None:
    dims = ParallelDims(world, dp_replicate=replicate, tp=tp)
    assert dims.dp_shard == shard
    assert dims.shape == (replicate, shard, tp)
    assert dims.dp_size == replicate * shard
    assert MESH_DIMS == ("dp_replicate", "dp_shard", "tp")


@pytest.mark.parametrize(("world", "replicate", "tp", "needle"), [
    (4, 3, 1, "parallel.dp_replicate (3) x parallel.tp (1) = 3 must divide the world size 4"),
    (4, 1, 3, "parallel.tp (3)"),
    (8, 2, 3, "= 6 must divide the world size 8"),
    (4, 0, 1, "parallel.dp_replicate must be a positive integer, got 0"),
    (4, 1, -2, "parallel.tp must be a positive integer"),
    (4, 1.5, 1, "parallel.dp_replicate must be a positive integer, got 1.5"),
])
def test_sizes_that_do_not_divide_the_world_are_named(world, replicate, tp, needle) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        ParallelDims(world, dp_replicate=replicate, tp=tp)


def test_tensor_parallel_must_divide_heads_kv_heads_and_mlp() -> None:
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, intermediate_size=96, hidden_size=64)
    check_tensor_parallel(config, 1)
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match=r"parallel.tp=4 .*num_key_value_heads=2") as e:
        check_tensor_parallel(config, 4)
    assert "num_attention_heads" not in str(e.value)  # 8 heads split fine: only the offenders are named
    with pytest.raises(ValueError, match=r"num_attention_heads=8, intermediate_size=96, num_key_value_heads=2"):
        check_tensor_parallel(config, 64)
    qwen = Qwen2Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=6, intermediate_size=90)
    with pytest.raises(ValueError, match="intermediate_size=90"):
        check_tensor_parallel(qwen, 4)
    with pytest.raises(ValueError, match=r"num_attention_heads=6.*num_key_value_heads=6"):  # kv defaults to heads
        check_tensor_parallel(LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=None,
                                                  intermediate_size=64), 4)
