"""PEFT interop: d9d LoRA -> PEFT format -> ``peft.PeftModel`` and a PEFT-made adapter -> d9d, same outputs."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from d9d.peft import inject_peft_and_freeze
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.lora import LoRAConfig, LoRAParameters
from d9d.peft.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter
from tests.fixtures import full_tune, lora, stack

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.local


def _tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _stack(with_norms: bool, rslora: bool = False) -> PeftStackConfig:
    methods = [lora(r".*\.(q_proj|v_proj)", dropout=0.1, use_rslora=rslora),
               lora(r".*\.down_proj", r=2, alpha=3, use_rslora=rslora)]
    return stack(*methods, *([full_tune(r".*norm")] if with_norms else []))


def _perturb(model) -> None:
    """Stands in for training: random adapters and norms."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1 if p.ndim == 1 else 0))


@pytest.mark.parametrize(("with_norms", "rslora"), [(False, False), (True, False), (True, True)])
def test_d9d_adapter_loads_in_peft_with_identical_outputs(tmp_path, with_norms, rslora):
    cfg = _stack(with_norms, rslora)
    model = _tiny_llama()
    inject_peft_and_freeze(peft_method_from_config(cfg), model)
    _perturb(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny",
                      task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert written["peft_type"] == "LORA"
    assert written["use_rslora"] is rslora
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    assert bool(written["modules_to_save"]) is with_norms

    x = torch.randint(0, 97, (2, 16))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        peft_model = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "adapter")).eval()
        got = peft_model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_peft_made_adapter_imports_into_d9d(tmp_path):
    lora_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "up_proj"],
                                  task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = peft.get_peft_model(_tiny_llama(), lora_config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = _lora_llama(r".*\.(q_proj|o_proj|up_proj)", 4, 12)
    load_peft_adapter(model, tmp_path / "adapter")
    x = torch.randint(0, 97, (2, 16))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, peft_model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_peft_made_adapter_with_modules_to_save_imports_into_d9d(tmp_path):
    # PEFT selects modules_to_save by name suffix: "embed_tokens" is model.embed_tokens, and "norm" is model.norm
    # plus every layer's input_layernorm / post_attention_layernorm.
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                  init_lora_weights=False, modules_to_save=["embed_tokens", "norm"])
    peft_model = peft.get_peft_model(_tiny_llama(), lora_config).eval()
    _perturb(peft_model)  # the saved modules' trained copies differ from the base weights
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert "base_model.model.model.embed_tokens.weight" in saved
    assert "base_model.model.model.layers.1.post_attention_layernorm.weight" in saved

    model = _lora_llama(r".*\.(q_proj|v_proj)", 4, 8)
    load_peft_adapter(model, tmp_path / "adapter")
    x = torch.randint(0, 97, (2, 16))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, peft_model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.model.embed_tokens.weight,
                                   saved["base_model.model.model.embed_tokens.weight"])


def _lora_llama(pattern: str, r: int, alpha: float):
    model = _tiny_llama()
    config = LoRAConfig(module_name_pattern=re.compile(pattern), params=LoRAParameters(r=r, alpha=alpha))
    inject_peft_and_freeze(peft_method_from_config(config), model)
    return model


@pytest.mark.parametrize(
    ("pattern", "r", "alpha", "message"),
    [
        (r".*\.(q_proj|k_proj)", 4, 8, r"missing key\(s\).*k_proj"),
        (r".*\.q_proj", 2, 4, r"q_proj.lora_A.weight' has shape"),
        (r".*\.q_proj", 4, 2, r"q_proj' has scale"),
    ],
    ids=["missing-layer", "wrong-rank", "wrong-scale"],
)
def test_import_rejects_mismatches_naming_them(tmp_path, pattern, r, alpha, message):
    save_peft_adapter(_lora_llama(r".*\.q_proj", 4, 8), tmp_path / "ok")
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(_lora_llama(pattern, r, alpha), tmp_path / "ok")


def test_import_without_adapter_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
        load_peft_adapter(_lora_llama(r".*\.q_proj", 4, 8), tmp_path)
