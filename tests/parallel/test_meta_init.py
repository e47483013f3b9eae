"""d9d.parallel.meta_init: meta-device construction and materialization, in one process."""

import re

import pytest
import torch
from torch import nn

from d9d.parallel import init_empty_parameters, materialize_model
from d9d.peft import inject_peft_and_freeze
from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters
from tests.tiny_llama import TinyLlama

pytestmark = pytest.mark.local


def test_parameters_on_meta_buffers_real() -> None:
    with init_empty_parameters():
        model = TinyLlama()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.rotary.inv_freq.device.type == "cpu"
    torch.testing.assert_close(model.rotary.inv_freq, TinyLlama().rotary.inv_freq)
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone after the context


def test_materialize_keeps_buffers_and_resets_lora() -> None:
    with init_empty_parameters():
        model = TinyLlama()
    config = LoRAConfig(module_name_pattern=re.compile(r".*q_proj"), params=LoRAParameters(r=2, alpha=2))
    inject_peft_and_freeze(LoRA(config), model)
    materialize_model(model, "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.testing.assert_close(model.rotary.inv_freq, TinyLlama().rotary.inv_freq)
    layer = model.layers[0].attention.q_proj
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    assert layer.lora_A.requires_grad
    assert not layer.base.weight.requires_grad


def test_materialize_refuses_meta_non_persistent_buffers() -> None:
    with torch.device("meta"):
        model = TinyLlama()
    with pytest.raises(ValueError, match=r"rotary\.inv_freq"):
        materialize_model(model, "cpu")
    materialize_model(model, "cpu", allow_uninitialized_buffers=True)


def test_materialize_refuses_real_parameters() -> None:
    model = nn.Linear(4, 4)
    weight = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"\['weight', 'bias'\] are not on the meta device"):
        materialize_model(model, "cpu")
    assert torch.equal(model.weight, weight)
