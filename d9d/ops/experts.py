"""Grouped LoRA for Mixture-of-Experts weights: each expert ``e`` applies ``W_e + scale B_e A_e`` to its own rows.

The rows of ``x`` are sorted by expert: rows ``[offsets[e-1], offsets[e])`` go to expert ``e``. No ``E x out x in``
tensor is ever formed: the LoRA term is two skinny GEMMs per expert in the forward, the backward recomputes
``dropout(x_e) A_e^T`` (nothing of ``x``'s size is saved beyond ``x`` itself) and the merge accumulates
``scale B_e A_e`` straight into ``W_e``, one expert at a time.

The ops ``d9d::grouped_lora_*`` are C++ kernels in ``d9d._C`` (``csrc/grouped_lora.cpp``, CPU and CUDA), with
their autograd in ``csrc/apply_autograd.cpp``. Here are their fake registrations, so they run under
``torch.compile`` and ``opcheck``, and the merge's DTensor sharding rule (experts sharded along dim 0, as FSDP2
shards them, merge shard-locally). With dropout, element ``(row, col)`` of ``x`` is kept as in the 2-D ops
(``torch.ops.d9d.dropout_mask`` of ``x``): the mask depends only on the seed, the row and the column, and the
backward regenerates it block by block.
"""

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from d9d.ops._registration import draw_seed, no_seed

__all__ = ["grouped_lora_linear", "grouped_lora_merge_"]


def _check(where: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
           offsets: torch.Tensor) -> None:
    if weight.dim() != 3 or lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{where}: weight, lora_A and lora_B must be 3-D (experts first), got "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    experts, out_features, in_features = weight.shape
    rank = lora_A.shape[1]
    if tuple(lora_A.shape) != (experts, rank, in_features) or tuple(lora_B.shape) != (experts, out_features, rank):
        raise ValueError(f"{where}: for weight {tuple(weight.shape)} lora_A must be ({experts}, r, {in_features}) and "
                         f"lora_B ({experts}, {out_features}, r), got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if x is not None and (x.dim() != 2 or x.shape[1] != in_features):
        raise ValueError(f"{where}: x must be (rows, {in_features}), got {tuple(x.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] != experts or offsets.dtype != torch.int64:
        raise ValueError(f"{where}: offsets must be int64 of shape ({experts},), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")


@torch.library.register_fake("d9d::grouped_lora_forward")
def _forward_fake(x, weight, lora_A, lora_B, offsets, scale, dropout, seed):
    _check("grouped_lora_forward", x, weight, lora_A, lora_B, offsets)
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.register_fake("d9d::grouped_lora_backward")
def _backward_fake(grad, x, weight, lora_A, lora_B, offsets, scale, dropout, seed, weight_grad):
    grad_W = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return torch.empty_like(x), grad_W, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.register_fake("d9d::grouped_lora_merge_")
def _merge_fake(weight, lora_A, lora_B, scale):
    return None


@register_sharding(torch.ops.d9d.grouped_lora_merge_.default)
def _merge_sharding(weight, lora_A, lora_B, scale):
    # Experts pair up across the three tensors: sharded along the expert dimension (FSDP2's Shard(0) on all three),
    # each rank merges its own experts with its own adapters and nothing moves.
    return [
        ([], [Replicate(), Replicate(), Replicate(), None]),
        ([], [Shard(0), Shard(0), Shard(0), None]),
    ]


def grouped_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        offsets: torch.Tensor, scale: float, dropout: float, training: bool,
                        seed: torch.Tensor | None = None) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] (W_e + scale B_e A_e dropout)^T`` for every expert ``e``.

    Args:
        x: ``(rows, in)``, rows sorted by expert.
        weight: Base weights ``(E, out, in)``, in ``x``'s dtype; meant to be frozen.
        lora_A: ``(E, r, in)``; cast to ``x``'s dtype here, so gradients reach float32 adapters.
        lora_B: ``(E, out, r)``; cast like ``lora_A``.
        offsets: int64 ``(E,)``: the end row of each expert's rows (the cumulative row counts).
        scale: Multiplier of the LoRA term.
        dropout: Dropout probability on the LoRA branch's input, in ``[0, 1)``.
        training: Whether dropout is active.
        seed: The dropout seed (a CPU int64 tensor of one element); drawn from torch's generator when ``None`` and
            dropout is active. Share one seed between calls that must draw the same mask; the mask is
            ``d9d.ops.lora.dropout_mask(x, dropout, seed)``.

    Returns:
        ``(rows, out)``.
    """
    if lora_A.dtype != x.dtype:
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)
    p = float(dropout) if training and dropout > 0 else 0.0
    if seed is None:
        seed = draw_seed() if p > 0 else no_seed()
    _check("grouped_lora_forward", x, weight, lora_A, lora_B, offsets)
    return torch.ops.d9d.grouped_lora_forward(x, weight, lora_A, lora_B, offsets, float(scale), p, seed)


@torch.no_grad()
def grouped_lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``W_e += scale * B_e A_e`` for every expert, in place, one expert at a time; shard-local on DTensors whose
    three tensors are all sharded along the expert dimension (FSDP2) or all replicated."""
    _check("grouped_lora_merge_", None, weight, lora_A, lora_B, torch.zeros(weight.shape[0], dtype=torch.int64))
    torch.ops.d9d.grouped_lora_merge_(weight, lora_A, lora_B, float(scale))
