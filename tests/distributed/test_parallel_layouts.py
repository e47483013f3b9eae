"""HSDP, TP x FSDP and TP x HSDP at world size 4 (and HSDP over two launches as two "nodes") under torchrun:
the same losses and the same export as world size 1."""

import json
from pathlib import Path

import pytest
import torch

from d9d.model_state.io import save_model_state
from d9d.parallel import find_free_port
from tests.distributed.test_distributed import eval_tokens, load_export, logits_of_export, torchrun
from tests.tiny_llama import TinyLlama
from tests.torchrun import wait_all

pytestmark = pytest.mark.distributed

TIMEOUT_S = 240
ENV = {"OMP_NUM_THREADS": "1"}
COLWISE_2D = "(_StridedShard(dim=0, sf=2), Shard(dim=0))"  # FSDP2's rows on top of TP's rows
PLACEMENTS = {  # layout -> placements of q_proj's weight (column-wise) and o_proj's weight (row-wise)
    "hsdp": ("(Replicate(), Shard(dim=0))", "(Replicate(), Shard(dim=0))"),
    "tp_fsdp": (COLWISE_2D, "(Shard(dim=0), Shard(dim=1))"),
    "tp_hsdp": (f"(Replicate(), {COLWISE_2D[1:-1]})", "(Replicate(), Shard(dim=0), Shard(dim=1))"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One world-4 launch runs every layout in turn; the reference and the two-"node" launch run beside it."""
    work = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    save_model_state(work / "base", None, TinyLlama(), shard_size_gb=20e-6, show_progress=False)
    reference = torchrun(work, "ws1", ["train_wide"], nproc=1, env=ENV)
    world4 = torchrun(work, "ws4", ["hsdp", "tp_fsdp", "tp_hsdp", "tp_dropout"], nproc=4, env=ENV)
    wait_all(reference, world4, timeout_s=TIMEOUT_S)
    port = find_free_port()
    nodes = [torchrun(work, "nodes", ["hsdp"], nproc=2, nnodes=2, node_rank=r, port=port, env=ENV) for r in (0, 1)]
    wait_all(*nodes, timeout_s=TIMEOUT_S)
    return work


def facts(run: Path) -> list[dict]:
    return [json.loads((run / f"facts_rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("tag", ["ws4/hsdp", "ws4/tp_fsdp", "ws4/tp_hsdp", "nodes/hsdp"])
def test_layout_trains_and_exports_like_world_size_one(runs: Path, tag: str) -> None:
    reference = runs / "ws1" / "wide"
    expected = json.loads((reference / "losses.json").read_text())
    assert expected[0] > expected[-1]
    assert json.loads((runs / tag / "losses.json").read_text()) == pytest.approx(expected, rel=1e-5)
    adapted = torch.load(runs / tag / "adapted_logits.pt")
    torch.testing.assert_close(logits_of_export(runs / tag / "export", eval_tokens()), adapted, rtol=1e-5, atol=1e-5)
    exported, single = load_export(runs / tag / "export"), load_export(reference / "export")
    assert exported.keys() == single.keys() == set(TinyLlama().state_dict())
    for key in single:
        torch.testing.assert_close(exported[key], single[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("tag", ["ws4/hsdp", "ws4/tp_fsdp", "ws4/tp_hsdp", "nodes/hsdp"])
def test_layout_places_weights_and_batches_as_named(runs: Path, tag: str) -> None:
    per_rank = facts(runs / tag)
    layout = tag.split("/")[1]
    q_weight, o_weight = PLACEMENTS[layout]
    for f in per_rank:
        assert (f["q_weight"], f["o_weight"]) == (q_weight, o_weight)
        assert f["q_lora_B"] == q_weight  # B is split like W's rows: the merge pairs them shard-locally
        assert f["o_lora_A"] == o_weight  # A is split like W's columns
        assert f["o_lora_A_moved"] > 0
    tp = 2 if layout.startswith("tp") else 1
    dp_ranks = [f["dp_rank"] for f in per_rank]
    assert dp_ranks == [r // tp for r in range(4)]  # the ranks of a tp group are consecutive and share a batch
    assert {f["dp_size"] for f in per_rank} == {4 // tp}


def test_dropout_under_tensor_parallelism_trains_and_exports(runs: Path) -> None:
    run = runs / "ws4" / "tp_fsdp_dropout"
    losses = json.loads((run / "losses.json").read_text())
    without = json.loads((runs / "ws4" / "tp_fsdp" / "losses.json").read_text())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(without[0], rel=1e-5)  # B starts at zero: dropout cannot act yet
    assert losses[1:] != pytest.approx(without[1:], rel=1e-5)  # then it does
    assert losses[-1] < losses[0]
    assert all(f["o_lora_A_moved"] > 0 for f in facts(run))
    adapted = torch.load(run / "adapted_logits.pt")
    torch.testing.assert_close(logits_of_export(run / "export", eval_tokens()), adapted, rtol=1e-5, atol=1e-5)
