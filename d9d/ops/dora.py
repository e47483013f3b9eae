"""DoRA (weight-decomposed LoRA) on the fused LoRA op and the weight-norm ops of ``d9d._C``."""

import torch
import torch.nn.functional as F

from d9d.ops import _registration  # noqa: F401  (loads d9d._C, which defines the ops)
from d9d.ops.lora import lora_linear

__all__ = ["dora_linear", "dora_merge_", "dora_weight_norm"]


@torch.library.register_fake("d9d::dora_weight_norm")
def _dora_weight_norm_fake(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: float) -> torch.Tensor:
    dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    return weight.new_empty((weight.shape[0],), dtype=dtype)


@torch.library.register_fake("d9d::dora_merge_")
def _dora_merge_fake(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                     scale: float) -> None:
    return None


@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W + scale B A||`` of each row of ``W``, taken over blocks of rows: no ``out x in`` temporary.

    Not differentiable: DoRA treats the norm as a constant (section 4.3 of the paper; PEFT detaches it too). On a
    block of rows of ``W`` and the same rows of ``B`` it gives those rows' norms, so sharded callers stay local.

    Args:
        weight: Base weight ``(out, in)``.
        lora_A: Down projection ``(r, in)``, any floating dtype.
        lora_B: Up projection ``(out, r)``, any floating dtype.
        scale: Multiplier of ``B A``.

    Returns:
        The norms ``(out,)``, in float32 for a 16-bit ``weight`` and in ``weight``'s dtype otherwise.
    """
    return torch.ops.d9d.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), float(scale))


@torch.no_grad()
def dora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                scale: float) -> None:
    """``W <- m / ||W + scale B A|| * (W + scale B A)`` in place, row by row (norms of the unmerged ``W``).

    Args:
        weight: Base weight ``(out, in)``, modified in place.
        lora_A: Down projection ``(r, in)``.
        lora_B: Up projection ``(out, r)``.
        magnitude: DoRA's magnitude ``(out,)``.
        scale: Multiplier of ``B A``.
    """
    torch.ops.d9d.dora_merge_(weight, lora_A, lora_B, magnitude, float(scale))


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """DoRA's output, exactly as Hugging Face PEFT computes it (``peft.tuners.lora.dora.DoraLinearLayer``).

    With ``f = magnitude / ||W + scale B A||_row`` (a constant for autograd) and ``d = dropout(x)``::

        y = x W^T + b + (f - 1) * d W^T + f * scale * d A^T B^T

    which without dropout (or in eval mode) is ``f * (x W^T + scale x A^T B^T) + b``: one fused LoRA op (the
    adapters folded into the weight for one GEMM) and one scaling pass, with no ``out x in`` temporary anywhere. With
    dropout, PEFT's form needs a second pass of the base weight, over ``x - d``. Dropout draws from torch's RNG in
    the same call PEFT makes (``nn.Dropout`` on ``x``), so a seeded run draws the same mask as PEFT.

    Args:
        x: Input of shape ``(..., in)``.
        weight: Base weight ``(out, in)`` in ``x``'s dtype (frozen).
        bias: Base bias ``(out,)`` or ``None``.
        lora_A: Down projection ``(r, in)``; cast to ``x``'s dtype (gradients reach float32 adapters).
        lora_B: Up projection ``(out, r)``; cast like ``lora_A``.
        magnitude: DoRA's magnitude ``(out,)``, trainable.
        scale: Multiplier of ``B A``.
        dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        training: Whether dropout is active.

    Returns:
        The output, of shape ``(..., out)``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dora_linear: dropout must be in [0, 1), got {dropout}")
    if lora_A.dtype != x.dtype:
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)
    norm = dora_weight_norm(weight, lora_A, lora_B, scale)
    factor = (magnitude / norm).to(x.dtype)
    if training and dropout > 0:
        dropped = F.dropout(x, dropout, training=True)
        adapted = lora_linear(dropped, weight, None, lora_A, lora_B, scale, 0.0, False)
        return torch.addcmul(F.linear(x - dropped, weight, bias), adapted, factor)
    adapted = lora_linear(x, weight, None, lora_A, lora_B, scale, 0.0, False)
    return adapted * factor if bias is None else torch.addcmul(bias.to(x.dtype), adapted, factor)
