"""The merged export carries what Hugging Face tools need: config.json and the base's generation_config.json."""

import json
import re
from pathlib import Path

import pytest
import torch

from d9d.finetune.export import export_merged
from d9d.finetune.model import BuiltModel, ModelSource
from d9d.finetune.tied import TiedWeights
from d9d.peft import inject_peft_and_freeze
from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters

pytestmark = pytest.mark.local
transformers = pytest.importorskip("transformers")


class NoTokenizer:
    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("with_generation_config", [True, False])
def test_merged_export_has_config_and_the_bases_generation_config(tmp_path: Path,
                                                                  with_generation_config: bool) -> None:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    if with_generation_config:
        transformers.GenerationConfig(max_new_tokens=7, do_sample=False, bos_token_id=1).save_pretrained(base)
    else:
        (base / "generation_config.json").unlink(missing_ok=True)
    method = LoRA(LoRAConfig(module_name_pattern=re.compile(r".*q_proj"), params=LoRAParameters(r=2, alpha=4)))
    inject_peft_and_freeze(method, model)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_()
    tokens = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        adapted = model(tokens).logits
    built = BuiltModel(model, method, model.config, TiedWeights({}), "LlamaForCausalLM")
    source = ModelSource(base, base, "causal_lm")
    out = export_merged(built, source, tmp_path / "merged", 1.0, NoTokenizer(), show_progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    if with_generation_config:
        assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
        assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7
    else:
        assert not (out / "generation_config.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, adapted, rtol=1e-5, atol=1e-5)
