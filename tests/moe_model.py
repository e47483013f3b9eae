"""A tiny transformers v5 Qwen3-MoE causal LM for tests, and its checkpoint in the older per-expert layout."""

import torch

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def tiny_moe_config(num_experts: int = 4):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=num_experts, num_experts_per_tok=2,
        max_position_embeddings=32, tie_word_embeddings=False,
    )


def tiny_moe(seed: int = 0, num_experts: int = 4):
    import transformers

    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(tiny_moe_config(num_experts)).eval()


def per_expert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each fused ``experts.gate_up_proj`` / ``experts.down_proj`` split into the older per-expert
    keys ``experts.{e}.gate_proj.weight``, ``.up_proj.weight``, ``.down_proj.weight``."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if name == "gate_up_proj":
            for e, fused in enumerate(value):
                gate, up = fused.chunk(2)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif name == "down_proj" and value.dim() == 3:
            for e, weight in enumerate(value):
                out[f"{prefix}.{e}.down_proj.weight"] = weight.clone()
        else:
            out[key] = value
    return out
