"""The job's process group under torchrun: one line per node, a dead peer named, checkpoints re-cut for another
world size."""

import pytest
import torch
from safetensors.torch import load_file

from d9d.finetune.checkpoint import load_checkpoint, rank_file
from d9d.parallel import find_free_port
from tests.finetune.session_worker import CONFIG, build
from tests.torchrun import Launch, torchrun, wait_all

pytestmark = pytest.mark.distributed

WORKER = ["-m", "tests.finetune.session_worker"]
ENV = {"OMP_NUM_THREADS": "1"}


def test_two_rank_checkpoint_loads_into_one_process(tmp_path):
    out = torchrun([*WORKER, str(tmp_path), "checkpoint"], timeout_s=180, env=ENV).stdout
    assert out.count("[d9d] node 0 (") == 1
    assert "ranks 0-1 of world size 2 on 1 node(s)" in out
    step_dir = tmp_path / "ckpt" / "step_00000002"
    assert sorted(p.name for p in step_dir.glob("*.safetensors")) == [rank_file(0), rank_file(1)]

    model, optimizer = build(world_sharded=False)
    assert load_checkpoint(step_dir, model, optimizer, peft_config=CONFIG.model_dump(mode="json")) == 2
    expected = load_file(str(tmp_path / "expected.safetensors"))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {f"param/{n}" for n in trained} | {f"exp_avg/{n}" for n in trained} == expected.keys()
    for name, param in trained.items():
        torch.testing.assert_close(param.detach(), expected[f"param/{name}"], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(optimizer.state[param]["exp_avg"], expected[f"exp_avg/{name}"], rtol=0, atol=0,
                                   msg=name)
        assert optimizer.state[param]["step"].item() == 2


def test_each_node_announces_itself_and_a_dead_peer_is_named(tmp_path):
    port = find_free_port()
    nodes = [Launch([*WORKER, str(tmp_path), "die"], tmp_path / f"node{r}.log", nproc=1, nnodes=2, node_rank=r,
                    port=port, env=ENV) for r in (0, 1)]
    wait_all(*nodes, timeout_s=180, expect_ok=False)
    first, second = (n.log.read_text() for n in nodes)
    assert "[d9d] node 0 (" in first
    assert "ranks 0 of world size 2 on 2 node(s)" in first
    assert "[d9d] node 1 (" in second
    assert "ranks 1 of world size 2 on 2 node(s)" in second
    assert first.count("error: ") == 1, first
    assert "rank 0 lost contact with the other ranks: rank(s) 1 did not answer" in first
