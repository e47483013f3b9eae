"""LoRA apply and merge on the fused kernels of ``d9d._C`` (``torch.ops.d9d.*``)."""

import torch
from torch.distributed.tensor import DTensor

from d9d.ops._registration import draw_seed, no_seed
from d9d.ops.sharding import lora_forward_dtensor

__all__ = ["dropout_mask", "lora_linear", "lora_merge_"]


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
    """``x W^T + b + scale * dropout(x) A^T B^T`` in one fused op; dropout is applied only when ``training``.

    There is no ``N x out`` temporary: without dropout the adapters are folded into ``W + scale B A`` for one GEMM
    (on inputs with enough rows), otherwise the LoRA term is accumulated into the base output. Autograd keeps only
    ``x``, the parameters and the seed: the backward regenerates the dropout mask and ``dropout(x) A^T``.

    Args:
        x: Input of shape ``(..., in)``.
        weight: Base weight ``(out, in)`` in ``x``'s dtype; meant to be frozen (its gradient, if asked for, is an
            extra GEMM).
        bias: Base bias ``(out,)`` in ``x``'s dtype, or ``None``.
        lora_A: Down projection ``(r, in)``, in ``x``'s dtype or any other. float32 adapters on bfloat16 or float16
            ``x`` go into the op as they are: it computes in ``x``'s dtype and returns float32 gradients, without
            rounding its float32 sums to 16 bits (see the README). Other dtypes are cast to ``x``'s here.
        lora_B: Up projection ``(out, r)``, as ``lora_A``.
        scale: Multiplier of the LoRA term (``alpha / r`` or ``alpha / sqrt(r)``).
        dropout: Dropout probability on the LoRA branch's input, in ``[0, 1)``.
        training: Whether dropout is active.

    On DTensors (tensor parallelism) the op runs through its sharding rules (``d9d/ops/sharding.py``), which also
    say how dropout masks are drawn per rank.

    Returns:
        The output, of shape ``(..., out)``.
    """
    # float32 adapters on 16-bit x go in as they are: the op rounds them for its products and returns their
    # gradients in float32, unrounded. Other dtypes are cast here, and autograd casts their gradients back.
    float32_on_16_bit = x.dtype in (torch.bfloat16, torch.float16) and lora_A.dtype == lora_B.dtype == torch.float32
    if not float32_on_16_bit:
        lora_A = lora_A.to(x.dtype)
        lora_B = lora_B.to(x.dtype)
    p = float(dropout) if training and dropout > 0 else 0.0
    seed = draw_seed() if p > 0 else no_seed()
    if isinstance(x, DTensor) or isinstance(weight, DTensor):  # tensor parallelism: see d9d/ops/sharding.py
        return lora_forward_dtensor(x, weight, bias, lora_A, lora_B, float(scale), p, seed)
    return torch.ops.d9d.lora_forward(x, weight, bias, lora_A, lora_B, float(scale), p, seed)


@torch.no_grad()
def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``W += scale * B A`` in place, accumulating the GEMM straight into ``W`` (no ``out x in`` temporary).

    Args:
        weight: Base weight ``(out, in)``, modified in place.
        lora_A: Down projection ``(r, in)``, any floating dtype (cast to ``weight``'s).
        lora_B: Up projection ``(out, r)``, any floating dtype (cast to ``weight``'s).
        scale: Multiplier of the LoRA term; ``-scale`` undoes a merge (up to rounding).
    """
    torch.ops.d9d.lora_merge_(weight, lora_A, lora_B, float(scale))


def dropout_mask(x: torch.Tensor, dropout: float, seed: torch.Tensor) -> torch.Tensor:
    """The keep mask (bool, ``x``'s shape) that the fused ops draw for ``seed``; for tests and debugging.

    Element ``(row, col)`` of ``x`` viewed as ``(N, in)`` depends only on ``(seed, row, col)``.
    """
    return torch.ops.d9d.dropout_mask(x, float(dropout), seed)
