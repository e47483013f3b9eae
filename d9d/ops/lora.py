"""LoRA apply and merge (plain PyTorch for now; the fused extension replaces these bodies)."""

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """``x W^T + b + scale * dropout(x) A^T B^T``; dropout is applied only when ``training``."""
    base = F.linear(x, weight, bias)
    xd = F.dropout(x, p=dropout, training=training) if dropout > 0 else x
    return base + scale * F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B).to(base.dtype)


@torch.no_grad()
def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``W += scale * B A`` in place."""
    weight.addmm_(lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=scale)


@torch.no_grad()
def lora_unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``W -= scale * B A`` in place (the inverse of :func:`lora_merge_`)."""
    weight.addmm_(lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=-scale)
