"""One ``LoRALinear`` under tensor parallelism (two ranks): the ops' sharding rules, the styles, dropout masks and
the shard-local merge, against an independent float64 re-computation."""

import json
from pathlib import Path

import pytest

from tests.torchrun import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp")
    torchrun([str(WORKER), str(out)], timeout_s=120, env={"OMP_NUM_THREADS": "1"})
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("case", ["colwise_p0.0", "colwise_p0.4", "rowwise_p0.0", "rowwise_p0.4"])
def test_layer_matches_float64_recomputation_with_the_same_masks(results: list[dict], case: str) -> None:
    for rank, per_rank in enumerate(results):
        r = per_rank[case]
        for what in ("y", "dx", "dA", "dB", "merge"):
            assert r[what] < 1e-12, (rank, case, what, r)
        assert r["implicit_replication_warnings"] == []  # the 0-dim seed is a scalar to DTensor
        if case.endswith("p0.4"):
            assert 0.3 < r["keep_fraction"] < 0.85, r  # dropout really dropped (p = 0.4)
        else:
            assert r["keep_fraction"] == 1.0


def test_placements_and_masks_per_style(results: list[dict]) -> None:
    r = results[0]
    assert r["colwise_p0.4"]["placements"] == {"lora_A": "(Replicate(),)", "lora_B": "(Shard(dim=0),)",
                                               "base.weight": "(Shard(dim=0),)", "base.bias": "(Shard(dim=0),)"}
    assert r["rowwise_p0.4"]["placements"] == {"lora_A": "(Shard(dim=1),)", "lora_B": "(Replicate(),)",
                                               "base.weight": "(Shard(dim=1),)", "base.bias": "(Replicate(),)"}
    # Column-wise every rank masks all of x: the same mask. Row-wise each rank masks its own columns: independent
    # masks (keyed by local column alone, both ranks would have drawn the same pattern).
    assert r["colwise_p0.4"]["masks_equal_across_ranks"]
    assert not r["rowwise_p0.4"]["masks_equal_across_ranks"]
    assert r["colwise_p0.4"]["merge_kept_placement"] == "(Shard(dim=0),)"
    assert r["rowwise_p0.4"]["merge_kept_placement"] == "(Shard(dim=1),)"


def test_rowwise_bias_is_added_once(results: list[dict]) -> None:
    assert all(r["rowwise_bias_direct"] < 1e-12 for r in results)
