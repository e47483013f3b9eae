"""Module-name patterns: fullmatched, bounded in time, and a no-match error that helps fix the pattern."""

import re

import pytest
from torch import nn

from d9d.peft import inject_peft_and_freeze
from d9d.peft.all import peft_method_from_config
from d9d.peft.lora import LoRALinear
from d9d.peft.module_match import PatternTimeoutError, match_modules
from tests.fixtures import TinyModel, assert_unchanged, full_tune, lora, snapshot, stack

pytestmark = pytest.mark.local


# Patterns that backtrack exponentially even in the `regex` package (it defuses simpler ones like '(a+)+$').
@pytest.mark.parametrize("pattern", [r"(a|aa)+$", r"(.|\w)+\.q_proj$"])
def test_runaway_pattern_is_stopped_with_a_named_error(pattern, monkeypatch):
    monkeypatch.setattr("d9d.peft.module_match.MATCH_BUDGET_S", 0.2)
    model = TinyModel()
    # Long names make the backtracking exponential, as real deep models' names do.
    model.add_module("a" * 40 + "_b", TinyModel(n_layers=1))
    model.add_module("self_attention_with_a_long_name_" * 2, nn.ModuleDict({"q_projection": nn.Linear(2, 2)}))
    before = snapshot(model)
    with pytest.raises(PatternTimeoutError, match=rf"LoRA\({re.escape(pattern)}\).*took more than 0.2 s"):
        inject_peft_and_freeze(peft_method_from_config(lora(pattern)), model)
    assert_unchanged(model, before)


def test_no_match_explains_fullmatch_suggests_a_prefix_and_lists_names(tiny_model):
    with pytest.raises(ValueError, match="matches no module") as info:
        match_modules(tiny_model, re.compile(r"attention\.q_proj"), "LoRA")
    message = str(info.value)
    assert "fullmatched against qualified module names" in message
    assert r"'.*\.attention\.q_proj' would match 2 module(s), e.g. 'layers.0.attention.q_proj'" in message
    assert "'layers', 'layers.0', 'layers.0.attention_norm'" in message


def test_no_match_without_a_prefix_that_helps_lists_names_only(tiny_model):
    with pytest.raises(ValueError, match="matches no module") as info:
        match_modules(tiny_model, re.compile(r"self_attn\..*"), "LoRA")
    assert "would match" not in str(info.value)
    assert "'layers.0'" in str(info.value)


def test_readme_examples_on_a_transformers_llama():
    """The README's first stack is for d9d-style names; its Hugging Face stack injects into a real Llama."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="matches no module"):
        match_modules(model, re.compile(r".*attention\..*_proj.*"), "LoRA")
    hf_config = stack(lora(r".*\.self_attn\.(q|k|v|o)_proj", r=8, alpha=16, dropout=0.05), full_tune(r".*norm"))
    inject_peft_and_freeze(peft_method_from_config(hf_config), model)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight"} < trained
