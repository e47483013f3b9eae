"""Worker run by ``torchrun`` from ``test_distributed.py``: one process of a multi-rank scenario.

Usage: ``worker.py WORKDIR SCENARIO [SCENARIO ...]``. Scenarios read inputs the test prepared under WORKDIR and
write what the test compares under WORKDIR.
"""

import json
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

import d9d.model_state.io.save as save_module
from d9d.model_state.io import checkpoint_mapper_for, load_model_state, save_model_state
from d9d.parallel import (
    ParallelDims,
    ParallelMesh,
    apply_tensor_parallel,
    init_distributed,
    init_empty_parameters,
    materialize_model,
    shard_model,
)
from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from tests.fixtures import lora_and_norms
from tests.tiny_llama import TinyLlama, TinyLlamaBlock, TinyLlamaConfig

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 12
BAD_CASES = ("missing_key", "unexpected_key", "shape_mismatch", "truncated_file", "index_missing_file",
             "unlisted_in_index")


# Mesh layouts at world size 4: (dp_replicate, tp); dp_shard is what they leave.
LAYOUTS = {"hsdp": (2, 1), "tp_fsdp": (1, 2), "tp_hsdp": (2, 2)}


def peft_config(lora_dtype: str | None = None, lora_pattern: str = r".*attention\..*_proj",
                dropout: float = 0.0) -> PeftStackConfig:
    return lora_and_norms(lora_pattern, r".*norm", r=3, alpha=6, dropout=dropout, dtype=lora_dtype)


def data(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    train = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    evaluation = torch.randint(0, vocab, (2, SEQ), generator=g)
    return train, evaluation


def build_sharded(ckpt: Path, dtype: torch.dtype = torch.float32, lora_dtype: str | None = None,
                  mp_policy: MixedPrecisionPolicy | None = None, config: PeftStackConfig | None = None,
                  reshard_after_forward: bool = True, mesh: ParallelMesh | None = None):
    """Meta init, inject, (tensor-parallelize,) shard, materialize, load: nothing is ever materialized in full."""
    torch.manual_seed(0)  # same adapter init on every rank and every world size
    with init_empty_parameters():
        model = TinyLlama(TinyLlamaConfig()).to(dtype)
    method = peft_method_from_config(config or peft_config(lora_dtype))
    injection = inject_peft_and_freeze(method, model)
    if mesh is not None:
        apply_tensor_parallel(model, mesh.tp)
    shard_model(model, TinyLlamaBlock, mesh=mesh.dp if mesh is not None else None, mp_policy=mp_policy,
                reshard_after_forward=reshard_after_forward)
    materialize_model(model, "cpu")
    load_model_state(ckpt, checkpoint_mapper_for(model, injection), "cpu", model, show_progress=False)
    return model, method


def train(model: torch.nn.Module, steps: int = STEPS, mesh: ParallelMesh | None = None) -> list[float]:
    world = dist.get_world_size()
    dp_rank, dp_size = (mesh.dp_rank, mesh.dp_size) if mesh is not None else (dist.get_rank(), world)
    tokens, _ = data(TinyLlamaConfig().vocab)
    local = tokens.chunk(dp_size)[dp_rank]  # each dp rank its equal part of the same global batch (tp ranks share)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        logits = model(local[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), local[:, 1:].flatten())
        loss.backward()  # FSDP2 averages gradients over ranks: the global mean, as every part has equal size
        opt.step()
        opt.zero_grad()
        reported = loss.detach().clone()
        dist.all_reduce(reported)  # the ranks of a tp group hold the same loss: the mean over all is the dp mean
        losses.append(reported.item() / world)
    return losses


def scenario_train(work: Path, tag: str) -> None:
    model, method = build_sharded(work / "base")
    losses = train(model)
    adapted = adapted_logits(model)
    save_model_state(work / tag / "trained", None, model, shard_size_gb=20e-6, show_progress=False)
    merge_and_export(model, method, adapted, work / tag)
    if dist.get_rank() == 0:
        (work / tag / "losses.json").write_text(json.dumps(losses))


def adapted_logits(model: torch.nn.Module) -> torch.Tensor:
    _, evaluation = data(TinyLlamaConfig().vocab)
    with torch.no_grad():
        return model(evaluation)


def merge_and_export(model: torch.nn.Module, method, adapted: torch.Tensor, out: Path) -> None:
    """Merges on the shards, exports to ``out/export``; rank 0 keeps the adapted logits next to it."""
    merge_peft(method, model)
    save_model_state(out / "export", None, model, shard_size_gb=30e-6, show_progress=False)
    if dist.get_rank() == 0:
        torch.save(adapted, out / "adapted_logits.pt")


def scenario_no_reshard(work: Path, tag: str) -> None:
    """``reshard_after_forward=False``: after a forward every group holds its parameters gathered; the merge must
    still land in the shards (and so in the export)."""
    out = work / tag / "no_reshard"
    model, method = build_sharded(work / "base", reshard_after_forward=False)
    train(model)
    adapted = adapted_logits(model)  # no backward follows: the gathered parameters stay
    weight = model.layers[0].attention.q_proj.base.weight
    gathered = not isinstance(weight, DTensor)
    merge_and_export(model, method, adapted, out)
    merged = adapted_logits(model)  # the sharded model itself now computes with the merged weights
    if dist.get_rank() == 0:
        (out / "facts.json").write_text(json.dumps({"gathered_before_merge": gathered}))
        torch.save(merged, out / "merged_model_logits.pt")


def scenario_root_lora(work: Path, tag: str) -> None:
    """LoRA on ``lm_head``, which no block holds: its weight and adapters live in the root FSDP group."""
    out = work / tag / "root_lora"
    config = peft_config(lora_pattern=r".*attention\..*_proj|lm_head")
    model, method = build_sharded(work / "base", config=config)
    head = model.lm_head
    facts = {"head_in_root_group": not isinstance(head, FSDPModule) and isinstance(model, FSDPModule),
             "head_is_lora": type(head).__name__}
    train(model)
    facts["head_lora_b_moved"] = head.lora_B.full_tensor().abs().max().item()
    merge_and_export(model, method, adapted_logits(model), out)
    if dist.get_rank() == 0:
        (out / "facts.json").write_text(json.dumps(facts))


def scenario_mixed_dtype(work: Path, tag: str) -> None:
    """bfloat16 base, float32 adapters, bfloat16 norms trained by FullTune: with and without an mp policy."""
    results = {}
    for name, policy in (("none", None),
                         ("bf16_compute", MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                               reduce_dtype=torch.float32))):
        model, method = build_sharded(work / "base", dtype=torch.bfloat16, lora_dtype="float32", mp_policy=policy)
        lora_a = model.layers[0].attention.q_proj.lora_A
        norm = model.layers[0].attention_norm.weight
        before = lora_a.full_tensor().clone()
        losses = train(model, steps=2)
        moved = (lora_a.full_tensor() - before).abs().max().item()
        merge_peft(method, model)
        results[name] = {"losses": losses, "lora_dtype": str(lora_a.dtype), "norm_dtype": str(norm.dtype),
                         "adapter_moved": moved,
                         "merged_dtype": str(model.layers[0].attention.q_proj.weight.dtype)}
    if dist.get_rank() == 0:
        (work / tag / "mixed_dtype.json").write_text(json.dumps(results))


def scenario_bad(work: Path, tag: str) -> None:
    errors = {}
    for case in BAD_CASES:
        try:
            build_sharded(work / "bad" / case)
            errors[case] = None
        except (ValueError, FileNotFoundError) as e:
            errors[case] = f"{type(e).__name__}: {e}"
    dist.barrier()  # every rank got here: nobody hangs on a bad checkpoint
    (work / tag / f"bad_errors_rank{dist.get_rank()}.json").write_text(json.dumps(errors))


def scenario_export(work: Path, tag: str) -> None:
    model, method = build_sharded(work / "base")
    merge_peft(method, model)
    if os.environ.get("D9D_TEST_KILL_RANK") == str(dist.get_rank()):
        original = save_module.save_file

        def save_then_die(*args, **kwargs):
            original(*args, **kwargs)
            os._exit(1)  # killed mid-export, after writing one file

        save_module.save_file = save_then_die
    save_model_state(work / tag / "export", None, model, shard_size_gb=20e-6, show_progress=False)


def scenario_layout(work: Path, tag: str, layout: str, dropout: float = 0.0) -> None:
    """Train, merge and export on a named mesh: HSDP, TP x FSDP or TP x HSDP (see ``LAYOUTS``)."""
    dp_replicate, tp = LAYOUTS[layout]
    mesh = ParallelDims(dist.get_world_size(), dp_replicate=dp_replicate, tp=tp).build_mesh("cpu")
    out = work / tag / (layout if dropout == 0 else f"{layout}_dropout")
    model, method = build_sharded(work / "base", mesh=mesh, config=peft_config(
        lora_pattern=r".*(attention\..*_proj|feed_forward\.(up|down)_proj)", dropout=dropout))
    q, o = model.layers[0].attention.q_proj, model.layers[0].attention.o_proj
    facts = {"dp_rank": mesh.dp_rank, "dp_size": mesh.dp_size, "mesh": mesh.world.mesh.tolist(),
             "q_weight": str(q.base.weight.placements), "q_lora_B": str(q.lora_B.placements),
             "o_weight": str(o.base.weight.placements), "o_lora_A": str(o.lora_A.placements)}
    before = o.lora_A.full_tensor().clone()
    losses = train(model, mesh=mesh)
    facts["o_lora_A_moved"] = (o.lora_A.full_tensor() - before).abs().max().item()
    model.eval()  # no dropout in the logits that the export must reproduce
    merge_and_export(model, method, adapted_logits(model), out)
    (out / f"facts_rank{dist.get_rank()}.json").write_text(json.dumps(facts))
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))


def scenario_train_wide(work: Path, tag: str) -> None:
    """``train`` with the LoRA targets of ``scenario_layout`` (attention and two MLP projections)."""
    out = work / tag / "wide"
    model, method = build_sharded(work / "base", config=peft_config(
        lora_pattern=r".*(attention\..*_proj|feed_forward\.(up|down)_proj)"))
    losses = train(model)
    merge_and_export(model, method, adapted_logits(model), out)
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))


SCENARIOS = {"hsdp": partial(scenario_layout, layout="hsdp"), "tp_fsdp": partial(scenario_layout, layout="tp_fsdp"),
             "tp_hsdp": partial(scenario_layout, layout="tp_hsdp"),
             "tp_dropout": partial(scenario_layout, layout="tp_fsdp", dropout=0.3), "train_wide": scenario_train_wide,
             "train": scenario_train, "mixed_dtype": scenario_mixed_dtype, "bad": scenario_bad,
             "export": scenario_export, "no_reshard": scenario_no_reshard, "root_lora": scenario_root_lora}


def main() -> None:
    work, tag, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    init_distributed(timeout=timedelta(seconds=60))
    (work / tag).mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            SCENARIOS[name](work, tag)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
