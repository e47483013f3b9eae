"""DoRA and LoRA on embeddings against Hugging Face PEFT on the same weights: logits, gradients and merges."""

import copy
import re

import pytest
import torch

peft = pytest.importorskip("peft")

from d9d.adapter import adapter_layers  # noqa: E402
from d9d.peft import inject_peft_and_freeze, merge_peft  # noqa: E402
from d9d.peft.all import peft_method_from_config  # noqa: E402
from d9d.peft.lora import DoRALinear, LoRAConfig, LoRAEmbedding, LoRAParameters  # noqa: E402
from tests.tiny_llama import TinyLlama  # noqa: E402

pytestmark = pytest.mark.local

DORA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # v_proj has a bias


def randomize(ours, theirs):
    """Fresh random adapters (and magnitudes) in d9d's model, copied into PEFT's."""
    for name, layer in adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            if isinstance(layer, LoRAEmbedding):
                torch.nn.init.normal_(layer.lora_embedding_A)
                torch.nn.init.normal_(layer.lora_embedding_B, std=0.1)
                peft_layer.lora_embedding_A["default"].copy_(layer.lora_embedding_A)
                peft_layer.lora_embedding_B["default"].copy_(layer.lora_embedding_B)
                continue
            torch.nn.init.normal_(layer.lora_A, std=0.2)
            torch.nn.init.normal_(layer.lora_B, std=0.2)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            if isinstance(layer, DoRALinear):
                # PEFT's init: the norms of the weights it wrapped, which d9d computed on wrapping too.
                torch.testing.assert_close(layer.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight)
                layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)


def paired_models(kind, dropout=0.0, use_rslora=False):
    torch.manual_seed(0)
    base = TinyLlama()
    ours = copy.deepcopy(base)
    if kind == "dora":
        pattern, targets = r".*\.(q_proj|v_proj|down_proj)", DORA_TARGETS
    else:
        pattern, targets = r"embed_tokens|.*\.q_proj", ["embed_tokens", "q_proj"]
    params = LoRAParameters(r=4, alpha=8, dropout=dropout, use_rslora=use_rslora, use_dora=kind == "dora")
    method = peft_method_from_config(LoRAConfig(module_name_pattern=re.compile(pattern), params=params))
    inject_peft_and_freeze(method, ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, use_rslora=use_rslora,
                             use_dora=kind == "dora")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(ours, theirs)
    return method, ours, theirs


def tokens():
    return torch.randint(0, 95, (2, 7))


def trainable(model):
    return {n.replace("base_model.model.", "").replace(".default", ""): p
            for n, p in model.named_parameters() if p.requires_grad}


GRAD_NAMES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector.weight": "lora_magnitude",
              "lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"}


@pytest.mark.parametrize(("kind", "use_rslora"), [("dora", False), ("dora", True), ("embedding", False)])
def test_logits_and_gradients_match_peft(kind, use_rslora):
    _, ours, theirs = paired_models(kind, use_rslora=use_rslora)
    ids = tokens()
    out_ours, out_theirs = ours(ids), theirs(ids)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for name, param in trainable(theirs).items():
        for suffix, ours_suffix in GRAD_NAMES.items():
            if name.endswith(suffix):
                mine = ours_params[name[: -len(suffix)] + ours_suffix]
                torch.testing.assert_close(mine.grad, param.grad, rtol=1e-4, atol=1e-6)
                checked += 1
    assert checked == len(trainable(theirs)) == sum(p.requires_grad for p in ours.parameters())


def test_dora_dropout_draws_peft_masks():
    _, ours, theirs = paired_models("dora", dropout=0.25)
    ours.train(), theirs.train()
    ids = tokens()
    torch.manual_seed(11)
    out_ours = ours(ids)
    torch.manual_seed(11)
    out_theirs = theirs(ids)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    torch.manual_seed(12)
    assert not torch.allclose(ours(ids), out_ours)  # dropout did act


@pytest.mark.parametrize("kind", ["dora", "embedding"])
def test_merged_model_equals_adapted_and_peft_merge(kind):
    method, ours, theirs = paired_models(kind)
    ids = tokens()
    with torch.no_grad():
        adapted = ours(ids)
        merge_peft(method, ours)
        torch.testing.assert_close(ours(ids), adapted, rtol=1e-5, atol=1e-5)
    assert not adapter_layers(ours)
    merged_theirs = theirs.merge_and_unload().state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, merged_theirs[key], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_stay_refused():
    model = TinyLlama()
    model.lm_head.weight = model.embed_tokens.weight
    method = peft_method_from_config(LoRAConfig(module_name_pattern=re.compile("embed_tokens"),
                                                params=LoRAParameters(r=2, alpha=2)))
    with pytest.raises(ValueError, match=r"tied"):
        inject_peft_and_freeze(method, model)
    assert type(model.embed_tokens) is torch.nn.Embedding


def test_dora_on_an_embedding_is_refused_by_name():
    method = peft_method_from_config(LoRAConfig(module_name_pattern=re.compile("embed_tokens|.*q_proj"),
                                                params=LoRAParameters(r=2, alpha=2, use_dora=True)))
    model = TinyLlama()
    with pytest.raises(ValueError, match=r"'embed_tokens' is an nn.Embedding; DoRA is supported on nn.Linear only"):
        inject_peft_and_freeze(method, model)
    assert not adapter_layers(model)
