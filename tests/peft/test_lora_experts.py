"""Expert LoRA on transformers v5 fused experts: the math, routing, freezing, merge, and PEFT interop both ways."""

import json
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d9d.adapter import adapter_layers
from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.lora import LoRAConfig, LoRAExperts, LoRAParameters
from d9d.peft.lora.peft_format import load_peft_adapter, save_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.local

EXPERTS = r"model\.layers\.\d+\.mlp\.experts"


def _tiny_moe(seed: int = 0, implementation: str = "eager"):
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, tie_word_embeddings=False,
    )
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def _stack(r: int = 2, alpha: float = 6.0, dropout: float = 0.0, attention: bool = True) -> PeftStackConfig:
    methods = [LoRAConfig(module_name_pattern=re.compile(EXPERTS),
                          params=LoRAParameters(r=r, alpha=alpha, dropout=dropout))]
    if attention:
        methods.append(LoRAConfig(module_name_pattern=re.compile(r".*\.(q_proj|v_proj)"),
                                  params=LoRAParameters(r=r, alpha=alpha)))
    return PeftStackConfig(methods=methods)


def _injected(seed: int = 0, implementation: str = "eager", **stack):
    model = _tiny_moe(seed, implementation)
    inject_peft_and_freeze(peft_method_from_config(_stack(**stack)), model)
    return model


def _perturb(model) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_experts_are_wrapped_router_frozen_only_adapters_train():
    model = _injected()
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, LoRAExperts)
    assert tuple(layer.gate_up_lora_A.shape) == (4, 2, 16)
    assert tuple(layer.gate_up_lora_B.shape) == (4, 16, 2)
    assert tuple(layer.down_lora_A.shape) == (4, 2, 8)
    assert tuple(layer.down_lora_B.shape) == (4, 16, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "_lora_" in n for n in trainable)
    assert "model.layers.0.mlp.gate.weight" not in trainable
    assert "model.layers.0.mlp.experts.base.gate_up_proj" not in trainable
    assert sum(".mlp.experts." in n for n in trainable) == 8


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_fresh_adapters_change_nothing_whatever_the_experts_implementation(implementation):
    reference = _tiny_moe(implementation=implementation)
    model = _injected(implementation=implementation)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits,
                                   rtol=1e-5, atol=1e-5)


def test_adapted_experts_equal_the_base_with_per_expert_merged_weights():
    """The LoRA term applies per expert, only to its tokens: equal to the base model with W_e + s B_e A_e."""
    model = _injected(attention=False)
    _perturb(model)
    reference = _tiny_moe()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            lora = layer.mlp.experts
            ref = reference.model.layers[i].mlp.experts
            ref.gate_up_proj += lora.scale * torch.einsum("eor,eri->eoi", lora.gate_up_lora_B, lora.gate_up_lora_A)
            ref.down_proj += lora.scale * torch.einsum("eor,eri->eoi", lora.down_lora_B, lora.down_lora_A)
        torch.testing.assert_close(model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits,
                                   rtol=1e-5, atol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces (views included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_experts_by_out_by_in_tensor_in_forward_backward_or_merge():
    hidden, inter, experts = 64, 48, 16
    config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                         num_experts_per_tok=2)
    base = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    torch.nn.init.normal_(base.gate_up_proj)
    torch.nn.init.normal_(base.down_proj)
    base.requires_grad_(False)
    layer = LoRAExperts(base, LoRAParameters(r=4, alpha=8, dropout=0.1)).train()
    x = torch.randn(8, hidden, requires_grad=True)
    top_k = torch.randint(0, experts, (8, 2))
    weights = torch.rand(8, 2)
    with _LargestAllocation() as mode:
        layer(x, top_k, weights).square().sum().backward()
        layer.merge_into_base()
    # The largest is a view of one expert's gate_up matrix (W_e); E x out x in would be 16 times that.
    assert mode.largest <= 2 * inter * hidden
    assert layer.gate_up_lora_A.grad is not None
    assert layer.down_lora_B.grad is not None


def test_dropout_trains_and_is_off_in_eval():
    model = _injected(dropout=0.5, attention=False)
    _perturb(model)
    model.train()
    logits = model(input_ids=_ids()).logits
    logits.sum().backward()
    assert model.model.layers[0].mlp.experts.down_lora_A.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        first, second = model(input_ids=_ids()).logits, model(input_ids=_ids()).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, logits.detach())


def test_merge_gives_back_the_original_experts_with_the_same_outputs():
    model = _tiny_moe()
    method = peft_method_from_config(_stack())
    inject_peft_and_freeze(method, model)
    _perturb(model)
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    merge_peft(method, model)
    assert not adapter_layers(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert set(model.state_dict()) == set(_tiny_moe().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_d9d_expert_adapter_loads_in_peft_with_identical_logits(tmp_path):
    model = _injected()
    _perturb(model)
    save_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
        peft_model = peft.PeftModel.from_pretrained(_tiny_moe(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(peft_model(input_ids=_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_expert_rank_and_alpha_unlike_attention_go_through_patterns_that_peft_applies(tmp_path):
    """Experts at r=4, alpha=3 beside attention at r=2, alpha=6: the experts' rank_pattern / alpha_pattern keys name
    parameters, which PEFT applies (PEFT 0.21 also warns that they match no module: its check looks at modules)."""
    model = _tiny_moe()
    inject_peft_and_freeze(peft_method_from_config(PeftStackConfig(methods=[
        LoRAConfig(module_name_pattern=re.compile(EXPERTS), params=LoRAParameters(r=4, alpha=3.0)),
        LoRAConfig(module_name_pattern=re.compile(r".*\.(q_proj|v_proj)"), params=LoRAParameters(r=2, alpha=6.0)),
    ])), model)
    _perturb(model)
    adapter = save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 6)  # attention's: four modules against two expert ones
    assert set(config["rank_pattern"].values()) == {4}
    assert set(config["alpha_pattern"].values()) == {3}
    for pattern in ("rank_pattern", "alpha_pattern"):
        assert all(key.endswith(("gate_up_proj", "down_proj")) for key in config[pattern])
    peft_model = peft.PeftModel.from_pretrained(_tiny_moe(), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=_ids()).logits, model(input_ids=_ids()).logits,
                                   rtol=1e-5, atol=1e-5)


def test_peft_made_expert_adapter_imports_into_d9d(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = peft.get_peft_model(_tiny_moe(), config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = _injected()
    load_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, peft_model(input_ids=_ids()).logits,
                                   rtol=1e-5, atol=1e-5)


def test_expert_adapter_of_another_expert_count_is_refused_naming_the_key(tmp_path):
    model = _injected()
    save_peft_adapter(model, tmp_path / "adapter")
    config = _tiny_moe().config
    config.num_experts = 8
    other = transformers.Qwen3MoeForCausalLM(config)
    inject_peft_and_freeze(peft_method_from_config(_stack()), other)
    before = other.model.layers[0].mlp.experts.gate_up_lora_A.detach().clone()
    with pytest.raises(ValueError, match=r"experts\.base_layer\.lora_A\.weight' has shape \(8, 16\), which does not "
                                         r"fit the model's parameter"):
        load_peft_adapter(other, tmp_path / "adapter")
    assert torch.equal(other.model.layers[0].mlp.experts.gate_up_lora_A, before)


def test_expert_adapter_with_another_alpha_for_one_parameter_is_refused(tmp_path):
    """PEFT scales each targeted parameter by its own alpha_pattern entry: down_proj's is checked too."""
    model = _injected()
    adapter = save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    experts = next(name for name, layer in adapter_layers(model).items() if isinstance(layer, LoRAExperts))
    down = f"{experts}.down_proj"
    config["alpha_pattern"] = {**(config.get("alpha_pattern") or {}), re.escape(down): 2 * config["lora_alpha"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    before = model.model.layers[0].mlp.experts.down_lora_A.detach().clone()
    with pytest.raises(ValueError, match=r"experts\.down_proj' has scale .* in the adapter but"):
        load_peft_adapter(model, adapter)
    assert torch.equal(model.model.layers[0].mlp.experts.down_lora_A, before)


def _tiny_mixtral(seed: int = 0):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def test_mixtral_experts_adapt_and_merge_like_qwen3_moe():
    """Mixtral's v5 ``MixtralExperts`` (``mlp.experts``) has the same 3-D layout: adapted outputs equal the base
    with per-expert merged weights, and ``merge_peft`` keeps them."""
    model = _tiny_mixtral()
    method = peft_method_from_config(_stack(attention=False))
    inject_peft_and_freeze(method, model)
    assert all(isinstance(layer.mlp.experts, LoRAExperts) for layer in model.model.layers)
    _perturb(model)
    reference = _tiny_mixtral()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            lora, ref = layer.mlp.experts, reference.model.layers[i].mlp.experts
            ref.gate_up_proj += lora.scale * torch.einsum("eor,eri->eoi", lora.gate_up_lora_B, lora.gate_up_lora_A)
            ref.down_proj += lora.scale * torch.einsum("eor,eri->eoi", lora.down_lora_B, lora.down_lora_A)
        adapted = model(input_ids=_ids()).logits
        torch.testing.assert_close(adapted, reference(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)
        merge_peft(method, model)
        assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
        torch.testing.assert_close(model(input_ids=_ids()).logits, adapted, rtol=1e-5, atol=1e-5)
