"""PEFT interop for DoRA and embedding LoRA, both ways, and the honest import of ``adapter_config.json`` options."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from d9d.adapter import adapter_layers
from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.lora import LoRAConfig, LoRAParameters
from d9d.peft.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter

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


def _lora_llama(pattern: str, use_dora: bool, r: int = 4, alpha: float = 8, method=False):
    model = _tiny_llama()
    config = LoRAConfig(module_name_pattern=re.compile(pattern),
                        params=LoRAParameters(r=r, alpha=alpha, use_dora=use_dora))
    injected = peft_method_from_config(config)
    inject_peft_and_freeze(injected, model)
    return (model, injected) if method else model


def _perturb(model) -> None:
    """Stands in for training: random adapters and magnitudes."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim == 1:  # a DoRA magnitude: keep it near the row norms
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


CASES = {
    "dora": (r".*\.(q_proj|v_proj|down_proj)", True, ["q_proj", "v_proj", "down_proj"]),
    "embedding": (r"model\.embed_tokens|.*\.q_proj", False, ["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_d9d_adapter_loads_in_peft_with_identical_outputs(tmp_path, case):
    pattern, use_dora, _ = CASES[case]
    model = _lora_llama(pattern, use_dora)
    _perturb(model)
    save_peft_adapter(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert written["use_dora"] is use_dora
    keys = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS).keys()
    if use_dora:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    else:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    x = torch.randint(0, 97, (2, 16))
    peft_model = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(peft_model, x), _logits(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_made_adapter_imports_into_d9d_and_merges(tmp_path, case):
    pattern, use_dora, targets = CASES[case]
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                                  init_lora_weights=False, use_dora=use_dora)
    peft_model = peft.get_peft_model(_tiny_llama(), lora_config)
    _perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model, method = _lora_llama(pattern, use_dora, method=True)
    load_peft_adapter(model, tmp_path / "adapter")
    x = torch.randint(0, 97, (2, 16))
    want = _logits(peft_model, x)
    torch.testing.assert_close(_logits(model, x), want, rtol=1e-5, atol=1e-5)
    merge_peft(method, model)
    assert not adapter_layers(model)
    torch.testing.assert_close(_logits(model, x), want, rtol=1e-5, atol=1e-5)


def test_import_refuses_a_use_dora_mismatch(tmp_path):
    save_peft_adapter(_lora_llama(r".*\.q_proj", use_dora=True), tmp_path / "dora")
    with pytest.raises(ValueError, match=r"use_dora=True but the model's layer 'model.layers.0.self_attn.q_proj'"):
        load_peft_adapter(_lora_llama(r".*\.q_proj", use_dora=False), tmp_path / "dora")


def test_export_refuses_a_stack_mixing_dora_and_plain_lora(tmp_path):
    model = _tiny_llama()
    stack = PeftStackConfig(methods=[
        LoRAConfig(module_name_pattern=re.compile(r".*\.q_proj"), params=LoRAParameters(r=2, alpha=2, use_dora=True)),
        LoRAConfig(module_name_pattern=re.compile(r"model\.embed_tokens"), params=LoRAParameters(r=2, alpha=2)),
    ])
    inject_peft_and_freeze(peft_method_from_config(stack), model)
    with pytest.raises(ValueError, match=r"one use_dora for all layers.*model\.embed_tokens"):
        save_peft_adapter(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# One adapter_config.json option per class of refusal; each would load into outputs that differ from PEFT's.
REFUSED = {
    "pissa": ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'"),
    "pissa-niter": ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4'"),
    "olora": ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
    "corda": ({"init_lora_weights": "corda"}, r"init_lora_weights='corda'"),
    "loftq": ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq'"),
    "lora-ga": ({"init_lora_weights": "lora_ga"}, r"init_lora_weights='lora_ga'"),
    "eva": ({"init_lora_weights": "eva"}, r"init_lora_weights='eva'"),
    "fan-in-fan-out": ({"fan_in_fan_out": True}, r"fan_in_fan_out=True"),
    "bias": ({"bias": "lora_only"}, r"bias='lora_only'"),
    "lora-bias": ({"lora_bias": True}, r"lora_bias=True"),
    "megatron": ({"megatron_config": {"tensor_model_parallel_size": 2}}, r"megatron_config="),
    "trainable-tokens": ({"trainable_token_indices": [1, 2]}, r"trainable_token_indices=\[1, 2\]"),
    "alora": ({"alora_invocation_tokens": [5]}, r"alora_invocation_tokens=\[5\]"),
    "qalora": ({"use_qalora": True}, r"use_qalora=True"),
    "layer-replication": ({"layer_replication": [[0, 2]]}, r"layer_replication="),
    "velora": ({"velora_config": {"rank": 2}}, r"velora_config="),
    "monteclora": ({"monteclora_config": {"n": 1}}, r"monteclora_config="),
    "bdlora": ({"use_bdlora": {"nblocks": 2}}, r"use_bdlora="),
    "arrow": ({"arrow_config": {"top_k": 2}}, r"arrow_config="),
    "kasa": ({"kasa_config": {"x": 1}}, r"kasa_config="),
    "weight-tying": ({"ensure_weight_tying": True}, r"ensure_weight_tying=True"),
    "unknown-field": ({"some_future_option": "on"}, r"some_future_option='on': unknown to d9d"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_import_refuses_options_it_cannot_reproduce_by_name(tmp_path, case):
    change, message = REFUSED[case]
    source = _lora_llama(r".*\.q_proj", use_dora=False)
    _perturb(source)
    save_peft_adapter(source, tmp_path / "adapter")
    path = tmp_path / "adapter" / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    model = _lora_llama(r".*\.q_proj", use_dora=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(model, tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", False])
def test_import_accepts_inits_that_only_initialize_the_adapters(tmp_path, init):
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)
    peft_model = peft.get_peft_model(_tiny_llama(), lora_config)
    _perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = _lora_llama(r".*\.q_proj", use_dora=False)
    load_peft_adapter(model, tmp_path / "adapter")
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(_logits(model, x), _logits(peft_model, x), rtol=1e-5, atol=1e-5)


def test_pissa_adapter_really_differs_when_loaded_on_the_original_base(tmp_path):
    """Why pissa is refused: PEFT rewrites the base weights, so its adapter alone does not reproduce the model."""
    peft_model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                    init_lora_weights="pissa"))
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q_proj.base_layer.weight, _tiny_llama().model.layers[0].self_attn.q_proj.weight)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa'.*change the base weights"):
        load_peft_adapter(_lora_llama(r".*\.q_proj", use_dora=False), tmp_path / "adapter")


def test_embedding_base_weights_saved_by_peft_load_as_peft_loads_them(tmp_path):
    """PEFT's save_embedding_layers stores the adapted embedding's base weights; from_pretrained loads them."""
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    peft.get_peft_model(_tiny_llama(), lora_config).save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / ADAPTER_WEIGHTS
    state = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    state[key] = state[key] + 0.05 * torch.randn(state[key].shape)  # as after resizing or editing the vocabulary
    save_file(state, str(path))
    x = torch.randint(0, 97, (2, 16))
    want = _logits(peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "adapter")), x)
    model = _lora_llama(r"model\.embed_tokens", use_dora=False)
    load_peft_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(_logits(model, x), want, rtol=1e-5, atol=1e-5)
