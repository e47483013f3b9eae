"""inject_peft_and_freeze: structure, trainability, mappers, and refusing bad requests without side effects."""

import re

import pytest
import torch
from torch import nn

from d9d.model_state.mapper.adapters import identity_mapper_from_keys
from d9d.model_state.mapper.compose import ModelStateMapperParallel
from d9d.peft import PeftInjectionResult, PeftMethod, count_parameters, inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStack, PeftStackConfig, peft_method_from_config
from d9d.peft.full_tune import FullTuneConfig
from d9d.peft.lora import LoRALinear
from tests.fixtures import TinyModel, assert_unchanged, full_tune, lora, lora_and_norms, snapshot, stack

pytestmark = pytest.mark.local

PROJ = re.compile(r".*attention\..*_proj.*")
NORM = re.compile(r".*norm.*")


def readme_config() -> PeftStackConfig:
    return lora_and_norms(dropout=0.05)


def test_readme_example_wraps_freezes_and_maps(tiny_model):
    x = torch.randn(3, 5, 16)
    expected = tiny_model(x)
    original_keys = set(tiny_model.state_dict())

    method = peft_method_from_config(readme_config())
    mapper = inject_peft_and_freeze(method, tiny_model)

    wrapped = {n for n, m in tiny_model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"layers.{i}.attention.{p}_proj" for i in range(2) for p in "qkvo"}
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    lora_names = {f"{w}.lora_{ab}" for w in wrapped for ab in "AB"}
    norm_names = {n for n, _ in tiny_model.named_parameters() if "norm" in n}
    assert trainable == lora_names | norm_names

    # A fresh injection computes exactly what the original computed (B is zero), also in training mode.
    tiny_model.eval()
    torch.testing.assert_close(tiny_model(x), expected, rtol=0, atol=0)

    # The mapper renames exactly the moved keys; with identity for the rest it loads the original checkpoint.
    renames = {next(iter(g.inputs)): next(iter(g.outputs)) for g in mapper.state_dependency_groups()}
    assert renames["layers.0.attention.q_proj.weight"] == "layers.0.attention.q_proj.base.weight"
    assert renames["layers.0.attention.q_proj.bias"] == "layers.0.attention.q_proj.base.bias"
    assert "layers.0.attention.k_proj.bias" not in renames  # k_proj has no bias
    assert set(renames) <= original_keys


def test_original_checkpoint_loads_through_mapper():
    torch.manual_seed(1)
    source = TinyModel()
    target = TinyModel()
    mapper = inject_peft_and_freeze(peft_method_from_config(readme_config()), target)
    state = source.state_dict()
    full = ModelStateMapperParallel([mapper, identity_mapper_from_keys(state.keys() - mapper.input_keys())])
    missing, unexpected = target.load_state_dict(full.apply_all(state), strict=False)
    assert unexpected == []
    assert missing
    assert all(".lora_" in k for k in missing)
    x = torch.randn(2, 16)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_lora_on_layer_with_bias_keeps_bias_frozen_in_base(tiny_model):
    inject_peft_and_freeze(peft_method_from_config(lora(re.compile(r"layers\.0\.attention\.q_proj"))), tiny_model)
    layer = tiny_model.layers[0].attention.q_proj
    assert isinstance(layer, LoRALinear)
    assert layer.base.bias is not None
    assert not layer.base.bias.requires_grad
    assert not layer.base.weight.requires_grad
    assert layer.lora_A.shape == (4, 16)
    assert layer.lora_B.shape == (16, 4)
    assert torch.count_nonzero(layer.lora_A) > 0
    assert torch.count_nonzero(layer.lora_B) == 0


def test_adapter_dtype_and_rslora_scale(tiny_model):
    inject_peft_and_freeze(peft_method_from_config(lora(r=16, alpha=8, use_rslora=True, dtype="bfloat16")), tiny_model)
    layer = tiny_model.layers[1].attention.v_proj
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.base.weight.dtype == torch.float32
    assert layer.scale == pytest.approx(8 / 4)


def test_count_parameters(tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    assert count_parameters(tiny_model).trainable == total
    inject_peft_and_freeze(peft_method_from_config(lora()), tiny_model)
    counts = count_parameters(tiny_model)
    expected = sum(m.lora_A.numel() + m.lora_B.numel() for m in tiny_model.modules() if isinstance(m, LoRALinear))
    assert counts.trainable == expected
    assert counts.total == total + expected
    assert f"{counts.trainable:,}" in str(counts)
    assert "trainable%" in str(counts)


def test_stack_order_does_not_change_the_outcome():
    # FullTune matching a LoRA-wrapped layer trains that layer's original weights, before or after LoRA.
    results = []
    for order in ([0, 1], [1, 0]):
        torch.manual_seed(0)
        model = TinyModel()
        parts = [lora(re.compile(r".*q_proj")), FullTuneConfig(module_name_pattern=re.compile(r"layers\.0\..*"))]
        inject_peft_and_freeze(peft_method_from_config(stack(*(parts[i] for i in order))), model)
        results.append(
            (
                {n for n, p in model.named_parameters() if p.requires_grad},
                [(n, type(m).__name__) for n, m in model.named_modules()],
            )
        )
    assert results[0] == results[1]
    assert "layers.0.attention.q_proj.base.weight" in results[0][0]
    assert "layers.0.attention.q_proj.lora_A" in results[0][0]
    assert "layers.1.attention.q_proj.base.weight" not in results[0][0]


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.conv_proj = nn.Conv1d(4, 4, 1)
        self.head = nn.Linear(4, 4)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lora(re.compile(r"nothing\.here")), r"'nothing\\.here' matches no module"),
        (FullTuneConfig(module_name_pattern=re.compile("missing")), "'missing' matches no module"),
        (
            stack(lora(), lora(re.compile(r"layers\.0\.attention\.q_proj"))),
            r"'layers\.0\.attention\.q_proj' would be wrapped by both",
        ),
        # A valid first method must not be applied when a later one is invalid.
        (stack(lora(), full_tune("nope")), "matches no"),
        (lora(re.compile(r"layers\.0\.attention_norm")), r"matches no nn\.Linear.*layers\.0\.attention_norm"),
    ],
)
def test_bad_requests_raise_and_leave_model_untouched(tiny_model, config, message):
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=message):
        inject_peft_and_freeze(peft_method_from_config(config), tiny_model)
    assert_unchanged(tiny_model, before)


def test_lora_on_non_linear_module_only_names_it():
    model = WithConv()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"attention\.conv_proj \(Conv1d\)"):
        inject_peft_and_freeze(peft_method_from_config(lora(re.compile(r"attention\..*"))), model)
    assert_unchanged(model, before)


def test_method_injects_once(tiny_model):
    method = peft_method_from_config(lora())
    inject_peft_and_freeze(method, tiny_model)
    with pytest.raises(RuntimeError, match="already injected"):
        inject_peft_and_freeze(method, TinyModel())


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight


def test_lora_refuses_a_tied_weight():
    model = TiedHead()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'head' is shared as \['emb.weight', 'head.weight'\].*untie"):
        inject_peft_and_freeze(peft_method_from_config(lora(re.compile("head"))), model)
    assert_unchanged(model, before)


def test_lora_refuses_a_module_registered_twice(tiny_model):
    tiny_model.alias = tiny_model.layers[0].attention.q_proj
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match="registered under several names"):
        inject_peft_and_freeze(peft_method_from_config(lora()), tiny_model)
    assert_unchanged(tiny_model, before)


def test_second_injection_does_not_wrap_inside_a_lora_layer(tiny_model):
    inject_peft_and_freeze(peft_method_from_config(lora()), tiny_model)
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.q_proj\.base' is inside an adapter layer already"):
        inject_peft_and_freeze(peft_method_from_config(lora()), tiny_model)
    assert_unchanged(tiny_model, before)


def test_linear_subclasses_are_left_alone():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2)  # reads out_proj.weight directly: wrapping it would break forward
    model.proj = nn.Linear(16, 16)
    inject_peft_and_freeze(peft_method_from_config(lora(re.compile(r".*proj"))), model)
    assert isinstance(model.proj, LoRALinear)
    assert not isinstance(model.attn.out_proj, LoRALinear)
    x = torch.randn(3, 2, 16)
    model.attn(x, x, x)


class OnlyInject(PeftMethod[FullTuneConfig]):
    """A custom method written to the minimal contract: inject, merge, from_config."""

    def __init__(self, config: FullTuneConfig):
        self.config = config
        self.merged = False

    @classmethod
    def from_config(cls, config: FullTuneConfig) -> "OnlyInject":
        return cls(config)

    def inject(self, module: nn.Module) -> PeftInjectionResult:
        params = [p for n, m in module.named_modules() if self.config.module_name_pattern.fullmatch(n)
                  for p in m.parameters()]
        return PeftInjectionResult(parameters_to_train=params, load_state_mappers=[])

    def merge(self, module: nn.Module) -> None:
        self.merged = True


def test_custom_method_with_minimal_contract_works_in_a_stack(tiny_model):
    custom = OnlyInject(FullTuneConfig(module_name_pattern=re.compile(r"norm")))
    stack = PeftStack([peft_method_from_config(lora()), custom])
    inject_peft_and_freeze(stack, tiny_model)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert {"norm.weight", "norm.bias", "layers.0.attention.q_proj.lora_A"} <= trainable
    assert "layers.0.attention_norm.weight" not in trainable
    merge_peft(stack, tiny_model)
    assert custom.merged
