"""d9d.parallel.tensor_parallel_plan: which projections split how, for injected and plain Llama-shaped models."""

import re

import pytest
import torch
from torch import nn

from d9d.parallel import LoRAColwiseParallel, LoRARowwiseParallel, init_empty_parameters, tensor_parallel_plan
from d9d.peft import inject_peft_and_freeze
from d9d.peft.lora import LoRA, LoRAConfig, LoRALinear, LoRAParameters
from tests.tiny_llama import TinyLlama

pytestmark = pytest.mark.local


def _styles(plan: dict) -> dict[str, str]:
    return {name: type(style).__name__ for name, style in plan.items()}


def test_plan_of_injected_demo_model_splits_attention_and_mlp() -> None:
    model = TinyLlama()
    inject_peft_and_freeze(LoRA.from_config(LoRAConfig(module_name_pattern=re.compile(r".*(q|o|up)_proj"),
                                                       params=LoRAParameters(r=2, alpha=4))), model)
    plan = _styles(tensor_parallel_plan(model))
    assert isinstance(model.layers[0].attention.q_proj, LoRALinear)
    assert isinstance(model.layers[0].attention.k_proj, nn.Linear)  # not injected: still split
    for layer in ("layers.0", "layers.1"):
        for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "feed_forward.gate_proj",
                     "feed_forward.up_proj"):
            assert plan.pop(f"{layer}.{name}") == LoRAColwiseParallel.__name__
        for name in ("attention.o_proj", "feed_forward.down_proj"):
            assert plan.pop(f"{layer}.{name}") == LoRARowwiseParallel.__name__
    assert plan == {}  # embeddings, norms and the LM head stay whole



def test_plan_refuses_dora_layers_by_name() -> None:
    model = TinyLlama()
    inject_peft_and_freeze(LoRA.from_config(LoRAConfig(module_name_pattern=re.compile(r".*q_proj"),
                                                       params=LoRAParameters(r=2, alpha=4, use_dora=True))), model)
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.q_proj' is a DoRALinear"):
        tensor_parallel_plan(model)

def test_plan_of_hugging_face_llama_on_meta() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    with init_empty_parameters():
        model = LlamaForCausalLM(config)
    assert model.model.layers[0].self_attn.q_proj.weight.device == torch.device("meta")
    plan = _styles(tensor_parallel_plan(model))
    assert plan["model.layers.0.self_attn.k_proj"] == LoRAColwiseParallel.__name__
    assert plan["model.layers.0.mlp.down_proj"] == LoRARowwiseParallel.__name__
    assert len(plan) == 7


def test_plan_names_what_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="has no module named one of"):
        tensor_parallel_plan(nn.Sequential(nn.Linear(2, 2)))
    odd = nn.Module()
    odd.q_proj = nn.Conv1d(2, 2, 1)
    with pytest.raises(ValueError, match=r"'q_proj' is a Conv1d; expected nn.Linear or an adapter layer"):
        tensor_parallel_plan(odd)
