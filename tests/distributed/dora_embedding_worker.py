"""Worker for ``test_dora_embedding_sharded.py``: DoRA and embedding LoRA on an FSDP2-sharded TinyLlama, two ranks.

Built on ``meta``, sharded, materialized and loaded as the fine-tune job does; then ``init_adapters_from_base``
gives DoRA's magnitude, and the forward, backward, PEFT export and merge are compared with one unsharded process.
"""

import json
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: ``tests`` is a package there

from d9d.adapter import adapter_layers, init_adapters_from_base
from d9d.dtensor import full_tensor, local_part
from d9d.model_state.io import checkpoint_mapper_for, load_model_state
from d9d.parallel import init_empty_parameters, materialize_model, shard_model
from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.lora import LoRAConfig, LoRAParameters
from d9d.peft.lora.peft_format import load_peft_adapter, save_peft_adapter
from tests.tiny_llama import TinyLlama, TinyLlamaBlock

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
work = Path(sys.argv[1])


def stack(use_dora: bool) -> PeftStackConfig:
    params = LoRAParameters(r=3, alpha=6, use_dora=use_dora)
    methods = [LoRAConfig(module_name_pattern=re.compile(r".*\.(q_proj|v_proj|down_proj)"), params=params)]
    if not use_dora:  # PEFT's format has one use_dora per adapter: embeddings go with plain LoRA
        methods.append(LoRAConfig(module_name_pattern=re.compile("embed_tokens"), params=params))
    return PeftStackConfig(methods=methods)


def trained_adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Stands in for training: the same random adapters on every rank (magnitudes scaled from their init)."""
    g = torch.Generator().manual_seed(5)
    values = {}
    for name, layer in adapter_layers(model).items():
        for param_name in layer.adapter_parameter_names():
            param = getattr(layer, param_name)
            noise = torch.randn(param.shape, generator=g)
            values[f"{name}.{param_name}"] = (full_tensor(param).detach() * (1 + 0.2 * noise) if param.ndim == 1
                                              else 0.2 * noise)
    return values


def assign(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in values.items():
            param = params[key]
            if isinstance(param, DTensor):
                param.to_local().copy_(local_part(value, param))
            else:
                param.copy_(value)


torch.manual_seed(0)
reference = TinyLlama()
if rank == 0:
    (work / "base").mkdir(exist_ok=True)
    save_file(reference.state_dict(), str(work / "base" / "model.safetensors"))
dist.barrier()
tokens = torch.randint(0, 95, (2, 9), generator=torch.Generator().manual_seed(3))
results = {}
for use_dora in (True, False):
    tag = "dora" if use_dora else "embedding"
    single = TinyLlama()
    single.load_state_dict(reference.state_dict())
    single_method = peft_method_from_config(stack(use_dora))
    inject_peft_and_freeze(single_method, single)
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if p.requires_grad}

    with init_empty_parameters():
        model = TinyLlama()
    method = peft_method_from_config(stack(use_dora))
    injection = inject_peft_and_freeze(method, model)
    shard_model(model, TinyLlamaBlock)
    materialize_model(model, "cpu")
    load_model_state(work / "base", checkpoint_mapper_for(model, injection), "cpu", model, show_progress=False)
    init_adapters_from_base(model)
    sharded = dict(model.named_parameters())
    for name, value in initial.items():
        if name.endswith("lora_magnitude"):  # the row norms of the loaded weights, computed shard-locally
            torch.testing.assert_close(full_tensor(sharded[name]).detach(), value, msg=name)
            assert isinstance(sharded[name], DTensor), name

    values = trained_adapters(single)
    assign(single, values)
    assign(model, values)
    want = single(tokens)
    got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    for name, param in single.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(full_tensor(sharded[name].grad), param.grad, rtol=1e-4, atol=1e-6, msg=name)

    save_peft_adapter(model, work / f"{tag}_adapter")
    reloaded = TinyLlama()
    reloaded.load_state_dict(reference.state_dict())
    inject_peft_and_freeze(peft_method_from_config(stack(use_dora)), reloaded)
    load_peft_adapter(reloaded, work / f"{tag}_adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), want, rtol=1e-5, atol=1e-5)

    merge_peft(method, model)
    merge_peft(single_method, single)
    merged = {k: full_tensor(v).detach() for k, v in model.state_dict().items()}
    for key, value in single.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
    results[tag] = "ok"

if rank == 0:
    (work / "results.json").write_text(json.dumps(results))
print(f"rank {rank}: dora embedding sharded ok", flush=True)
dist.destroy_process_group()
