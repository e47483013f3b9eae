"""Worker for ``test_experts_distributed.py``: expert LoRA + attention LoRA on a sharded Qwen3-MoE, two ranks.

Usage: ``experts_worker.py WORKDIR``. Loads WORKDIR/per_expert (the older per-expert checkpoint layout) into the
fused-experts model through stack + concatenate mappers, trains, writes the PEFT adapter, merges shard-locally
and exports; rank 0 writes the logits and facts the test compares.
"""

import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: ``tests`` is a package there

from d9d.model_state.io import checkpoint_mapper_for, load_model_state, read_layout, save_model_state
from d9d.model_state.mapper import fused_experts_loading_mapper
from d9d.parallel import init_distributed, init_empty_parameters, materialize_model, shard_model
from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.lora import LoRAConfig, LoRAParameters
from d9d.peft.lora.peft_format import save_peft_adapter
from tests.moe_model import tiny_moe_config

STACK = PeftStackConfig(methods=[
    LoRAConfig(module_name_pattern=re.compile(pattern), params=LoRAParameters(r=2, alpha=4))
    for pattern in (r"model\.layers\.\d+\.mlp\.experts", r".*\.(q_proj|v_proj)")
])


def main(work: Path) -> None:
    import transformers

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    config = tiny_moe_config()
    torch.manual_seed(0)
    with init_empty_parameters():
        model = transformers.Qwen3MoeForCausalLM(config)
    method = peft_method_from_config(STACK)
    injection = inject_peft_and_freeze(method, model)
    shard_model(model, transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeDecoderLayer)
    materialize_model(model, "cpu")
    # The per-expert keys are stacked over the experts and gate/up concatenated into the fused 3-D weights.
    mapper = fused_experts_loading_mapper(checkpoint_mapper_for(model, injection), read_layout(work / "per_expert"))
    load_model_state(work / "per_expert", mapper, "cpu", model, show_progress=False)

    evaluation = torch.load(work / "eval_tokens.pt")
    model.eval()
    with torch.no_grad():
        loaded = model(input_ids=evaluation).logits
    experts = model.model.layers[0].mlp.experts
    facts = {
        "placements": {n: str(getattr(experts, n).placements) for n in
                       ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")},
        "base_placements": str(experts.base.gate_up_proj.placements),
        "router_trains": model.model.layers[0].mlp.gate.weight.requires_grad,
        "local_experts": experts.base.gate_up_proj.to_local().shape[0],
    }

    model.train()
    tokens = torch.load(work / "train_tokens.pt").chunk(world)[rank]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(3):
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=evaluation).logits
    facts["down_lora_B_moved"] = experts.down_lora_B.full_tensor().abs().max().item()
    save_peft_adapter(model, work / "adapter")
    storage = experts.base.gate_up_proj.to_local().data_ptr()
    merge_peft(method, model)
    merged = model.model.layers[0].mlp.experts
    facts["merged_in_place"] = (isinstance(merged.gate_up_proj, DTensor)
                                and merged.gate_up_proj.placements == (Shard(0),)
                                and merged.gate_up_proj.to_local().data_ptr() == storage)
    save_model_state(work / "export", None, model, shard_size_gb=20e-6, show_progress=False)
    if rank == 0:
        torch.save({"loaded": loaded, "adapted": adapted}, work / "logits.pt")
        (work / "facts.json").write_text(json.dumps({**facts, "losses": losses}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
