"""Injection and merge on real Hugging Face transformers architectures (built from a config, no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from d9d.peft import inject_peft_and_freeze, merge_peft  # noqa: E402
from d9d.peft.all import peft_method_from_config  # noqa: E402
from d9d.peft.lora import LoRALinear  # noqa: E402
from tests.fixtures import lora_and_norms  # noqa: E402

pytestmark = pytest.mark.local


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize(
    ("build", "lora_pattern", "full_pattern", "expected_wrapped"),
    [
        (tiny_llama, r".*self_attn\.(q|v)_proj", r".*input_layernorm", 4),
        (tiny_bert, r".*attention\.self\.(query|value)", r".*attention\.output\.LayerNorm", 4),
    ],
)
def test_inject_train_merge_on_transformers(build, lora_pattern, full_pattern, expected_wrapped):
    model = build()
    keys = list(model.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    before = model(ids)[0]
    method = peft_method_from_config(lora_and_norms(lora_pattern, full_pattern))
    inject_peft_and_freeze(method, model)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == expected_wrapped
    torch.testing.assert_close(model(ids)[0], before, rtol=0, atol=0)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        model(ids)[0].float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    adapted = model(ids)[0]
    merge_peft(method, model)
    assert list(model.state_dict()) == keys
    merged = model(ids)[0]
    assert (merged - adapted).abs().max() / adapted.abs().max() < 1e-5
