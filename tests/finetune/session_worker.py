"""Run by ``torchrun`` from ``test_session.py`` (``python -m tests.finetune.session_worker WORKDIR SCENARIO``).

Scenarios:
    checkpoint: train a sharded toy model two steps, save an adapter checkpoint, and write the full trained tensors
        and optimizer state for the test to compare with a load at another world size.
    die: the last rank exits abruptly while the others wait in a collective.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from d9d.dtensor import full_tensor
from d9d.finetune.checkpoint import save_checkpoint
from d9d.finetune.session import RunFailedError, announce_nodes, distributed_session
from d9d.parallel import shard_model
from d9d.peft import inject_peft_and_freeze
from d9d.peft.all import peft_method_from_config
from tests.fixtures import TinyModel, ToyBlock, lora_and_norms

CONFIG = lora_and_norms(dropout=0.0)


def build(world_sharded: bool):
    torch.manual_seed(0)
    model = TinyModel(dim=18)  # 18 rows: uneven shards over 4 ranks, even over 2
    inject_peft_and_freeze(peft_method_from_config(CONFIG), model)
    if world_sharded:
        shard_model(model, ToyBlock)  # a real (not meta) model: each rank keeps its shard of the same weights
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def scenario_checkpoint(work: Path) -> None:
    model, optimizer = build(world_sharded=True)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 18)  # every rank the same batch: the test's single-process reference needs no split
    for _ in range(2):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(work / "ckpt", 2, model, optimizer, keep_last=1, peft_config=CONFIG.model_dump(mode="json"))
    expected = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected[f"param/{name}"] = full_tensor(p.detach()).clone()
            expected[f"exp_avg/{name}"] = full_tensor(optimizer.state[p]["exp_avg"]).clone()
    if torch.distributed.get_rank() == 0:
        save_file(expected, str(work / "expected.safetensors"))


def scenario_die(work: Path) -> None:
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        os._exit(3)  # no error message, no goodbye: like a kill or an out-of-memory
    torch.distributed.barrier()


def main() -> int:
    work, scenario = Path(sys.argv[1]), sys.argv[2]
    try:
        with distributed_session(timeout_s=60) as session:
            announce_nodes(session)
            {"checkpoint": scenario_checkpoint, "die": scenario_die}[scenario](work)
    except RunFailedError as e:
        if e.print_here:
            print(f"error: {e.message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
