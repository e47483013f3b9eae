"""merge_peft: folds exactly what was injected, reproduces the adapted model, refuses a second merge."""


import pytest
import torch
from torch import nn

from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.lora import LoRALinear, LoRAParameters
from tests.fixtures import TinyModel, lora_and_norms

pytestmark = pytest.mark.local


def stack(dropout: float = 0.05, dtype: str | None = None) -> PeftStackConfig:
    return lora_and_norms(dropout=dropout, dtype=dtype)


def train_a_few_steps(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 7, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("adapter_dtype", [None, "bfloat16"])
def test_merged_model_reproduces_adapted_model(adapter_dtype):
    torch.manual_seed(0)
    model = TinyModel()
    reference_shapes = {n: p.shape for n, p in model.named_parameters()}
    method = peft_method_from_config(stack(dtype=adapter_dtype))
    inject_peft_and_freeze(method, model)
    train_a_few_steps(model)
    lora_b = model.layers[0].attention.q_proj.lora_B
    assert torch.count_nonzero(lora_b) > 0, "training must move B away from zero for the test to mean anything"

    x = torch.randn(3, 5, 16)
    model.eval()
    adapted = model(x)
    merge_peft(method, model)

    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {n: p.shape for n, p in model.named_parameters()} == reference_shapes
    merged = model(x)
    assert (merged - adapted).abs().max() / adapted.abs().max() < 1e-5


def perturb_adapters(model: nn.Module) -> None:
    """Random non-zero adapters, so that a wrong or repeated merge changes the weights."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()


@pytest.mark.parametrize("config", [stack(), stack().methods[0]], ids=["stack", "lora-only"])
def test_merge_twice_is_refused(config):
    model = TinyModel()
    method = peft_method_from_config(config)
    inject_peft_and_freeze(method, model)
    perturb_adapters(model)
    merge_peft(method, model)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="already merged"):
        merge_peft(method, model)
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())


def test_merge_without_inject_is_refused():
    with pytest.raises(RuntimeError, match="never injected"):
        merge_peft(peft_method_from_config(stack()), TinyModel())


def test_merge_folds_only_the_layers_inject_wrapped():
    torch.manual_seed(0)
    model = TinyModel()
    method = peft_method_from_config(stack())
    inject_peft_and_freeze(method, model)
    # A layer added after injection matches the pattern but was never wrapped by this method: merge leaves it.
    stranger = LoRALinear(nn.Linear(16, 16), LoRAParameters(r=2, alpha=2))
    model.layers[0].attention.extra_proj = stranger
    merge_peft(method, model)
    assert model.layers[0].attention.extra_proj is stranger
    assert isinstance(model.layers[0].attention.q_proj, nn.Linear)


def test_merge_refuses_when_a_wrapped_layer_was_replaced():
    model = TinyModel()
    method = peft_method_from_config(stack())
    inject_peft_and_freeze(method, model)
    perturb_adapters(model)
    wrapper = model.layers[1].attention.v_proj
    model.layers[1].attention.v_proj = nn.Linear(16, 8)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"layers\.1\.attention\.v_proj' is no longer a LoRA layer"):
        merge_peft(method, model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # Nothing was marked merged either: once the layer is back, the merge goes through.
    model.layers[1].attention.v_proj = wrapper
    merge_peft(method, model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_merge_restores_original_state_dict_keys():
    model = TinyModel()
    keys = list(model.state_dict())
    method = peft_method_from_config(stack())
    inject_peft_and_freeze(method, model)
    merge_peft(method, model)
    assert list(model.state_dict()) == keys
