"""DoRA's magnitude: from the weights on wrapping, NaN after meta materialization until ``init_adapters_from_base``."""

import re

import pytest
import torch
from safetensors.torch import save_file

from d9d.adapter import init_adapters_from_base
from d9d.model_state.io import checkpoint_mapper_for, load_model_state
from d9d.parallel import init_empty_parameters, materialize_model
from d9d.peft import inject_peft_and_freeze
from d9d.peft.lora import DoRALinear, LoRA, LoRAConfig, LoRAParameters
from tests.tiny_llama import TinyLlama

pytestmark = pytest.mark.local


def dora() -> LoRA:
    return LoRA(LoRAConfig(module_name_pattern=re.compile(r".*\.(q_proj|v_proj)"),
                           params=LoRAParameters(r=2, alpha=4, use_dora=True)))


def test_wrapping_loaded_weights_takes_their_row_norms():
    model = TinyLlama()
    inject_peft_and_freeze(dora(), model)
    layer = model.layers[0].attention.v_proj
    assert isinstance(layer, DoRALinear)
    torch.testing.assert_close(layer.lora_magnitude.detach(), torch.linalg.vector_norm(layer.base.weight, dim=1))
    assert layer.lora_magnitude.requires_grad
    tokens = torch.randint(0, 95, (2, 5))
    reference = TinyLlama()
    reference.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                               if "lora_" not in k})
    with torch.no_grad():  # a fresh DoRA layer (B = 0, m = ||W||) computes what the base model computed
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


def test_meta_model_gets_the_magnitude_after_load_model_state(tmp_path):
    torch.manual_seed(0)
    pretrained = TinyLlama()
    save_file(pretrained.state_dict(), str(tmp_path / "model.safetensors"))
    with init_empty_parameters():
        model = TinyLlama()
    injection = inject_peft_and_freeze(dora(), model)
    materialize_model(model, "cpu")
    load_model_state(tmp_path, checkpoint_mapper_for(model, injection), "cpu", model, show_progress=False)
    layer = model.layers[1].attention.q_proj
    assert torch.isnan(layer.lora_magnitude).all()  # not derived from uninitialized memory: loud until the call
    init_adapters_from_base(model)
    want = torch.linalg.vector_norm(pretrained.layers[1].attention.q_proj.weight, dim=1)
    torch.testing.assert_close(layer.lora_magnitude.detach(), want)
    tokens = torch.randint(0, 95, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), pretrained(tokens), rtol=1e-5, atol=1e-5)


def test_init_from_base_is_a_no_op_for_plain_lora():
    model = TinyLlama()
    inject_peft_and_freeze(LoRA(LoRAConfig(module_name_pattern=re.compile(r".*q_proj"),
                                           params=LoRAParameters(r=2, alpha=2))), model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_adapters_from_base(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bfloat16_base_with_float32_adapters():
    model = TinyLlama().to(torch.bfloat16)
    inject_peft_and_freeze(LoRA(LoRAConfig(module_name_pattern=re.compile(r".*q_proj"),
                                           params=LoRAParameters(r=2, alpha=2, use_dora=True, dtype="float32"))),
                           model)
    layer = model.layers[0].attention.q_proj
    assert layer.lora_magnitude.dtype == torch.float32
    torch.testing.assert_close(layer.lora_magnitude.detach(),
                               torch.linalg.vector_norm(layer.base.weight.float(), dim=1))
    model(torch.randint(0, 95, (2, 5))).float().square().mean().backward()
    assert layer.lora_magnitude.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_magnitude.grad).all()
