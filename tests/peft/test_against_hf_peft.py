"""LoRA math against Hugging Face PEFT (the reference implementation) on the same weights."""

import copy
import re

import pytest
import torch

peft = pytest.importorskip("peft")

from d9d.peft import inject_peft_and_freeze, merge_peft  # noqa: E402
from d9d.peft.all import peft_method_from_config  # noqa: E402
from d9d.peft.lora import LoRAConfig, LoRALinear, LoRAParameters  # noqa: E402
from tests.fixtures import TinyModel  # noqa: E402

pytestmark = pytest.mark.local

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def paired_models(use_rslora: bool):
    torch.manual_seed(0)
    base = TinyModel().double()
    ours = copy.deepcopy(base)
    config = LoRAConfig(
        module_name_pattern=re.compile(r".*attention\.(q|k|v|o)_proj"),
        params=LoRAParameters(r=4, alpha=12, use_rslora=use_rslora),
    )
    method = peft_method_from_config(config)
    inject_peft_and_freeze(method, ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, use_rslora=use_rslora, lora_dropout=0.0),
    )
    # Fresh random adapters (B non-zero), copied into both.
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_A)
            torch.nn.init.normal_(module.lora_B)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.data.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.data.copy_(module.lora_B)
    return method, ours, theirs


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_peft(use_rslora):
    _, ours, theirs = paired_models(use_rslora)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-12, atol=1e-12)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    q_ours = ours.layers[1].attention.q_proj
    q_theirs = theirs.base_model.model.layers[1].attention.q_proj
    torch.testing.assert_close(q_ours.lora_A.grad, q_theirs.lora_A["default"].weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q_ours.lora_B.grad, q_theirs.lora_B["default"].weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_weights_match_peft_merge_and_unload(use_rslora):
    method, ours, theirs = paired_models(use_rslora)
    merge_peft(method, ours)
    merged_theirs = theirs.merge_and_unload()
    theirs_state = merged_theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], rtol=1e-12, atol=1e-12)
