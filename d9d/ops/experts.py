"""Grouped LoRA for Mixture-of-Experts weights: each expert ``e`` applies ``W_e + scale B_e A_e`` to its own rows.

The rows of ``x`` are sorted by expert: rows ``[offsets[e-1], offsets[e])`` go to expert ``e``. No ``E x out x in``
tensor is ever formed: the LoRA term is two skinny GEMMs per expert in the forward, the backward recomputes
``dropout(x_e) A_e^T`` (nothing of ``x``'s size is saved beyond ``x`` itself) and the merge accumulates
``scale B_e A_e`` straight into ``W_e``, one expert at a time.

The ops are ``torch.library`` custom ops (``d9d::grouped_lora_*``) with fake and autograd registrations, so they run
under ``torch.compile`` and ``opcheck``; the merge has a DTensor sharding rule (experts sharded along dim 0, as
FSDP2 shards them, merge shard-locally). Their kernels are ATen GEMMs per expert (``addmm`` with ``out=``),
written here in Python, on any device.
"""

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

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


def _ranges(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, first row, end row)`` of each expert that has rows."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(starts, ends, strict=True)) if hi > lo]


def _keep_scale(x: torch.Tensor, dropout: float, seed: torch.Tensor) -> torch.Tensor:
    """``keep / (1 - p)`` for every element of ``x``: the same for the same ``seed`` (the backward redraws it)."""
    generator = torch.Generator(device=x.device).manual_seed(int(seed.item()))
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout
    return keep.to(x.dtype) / (1.0 - dropout)


@torch.library.custom_op("d9d::grouped_lora_forward", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             offsets: torch.Tensor, scale: float, dropout: float, seed: torch.Tensor) -> torch.Tensor:
    _check("grouped_lora_forward", x, weight, lora_A, lora_B, offsets)
    out = x.new_zeros(x.shape[0], weight.shape[1])
    x_lora = x * _keep_scale(x, dropout, seed) if dropout > 0 else x
    for e, lo, hi in _ranges(offsets):
        torch.mm(x[lo:hi], weight[e].t(), out=out[lo:hi])
        xa = x_lora[lo:hi] @ lora_A[e].t()  # rows x r
        out[lo:hi].addmm_(xa, lora_B[e].t(), alpha=scale)
    return out


@_forward.register_fake
def _forward_fake(x, weight, lora_A, lora_B, offsets, scale, dropout, seed):
    _check("grouped_lora_forward", x, weight, lora_A, lora_B, offsets)
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("d9d::grouped_lora_backward", mutates_args=())
def _backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              offsets: torch.Tensor, scale: float, dropout: float, seed: torch.Tensor,
              weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = torch.zeros_like(x)
    grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    grad_W = torch.zeros_like(weight) if weight_grad else weight.new_empty(0)
    keep = _keep_scale(x, dropout, seed) if dropout > 0 else None
    for e, lo, hi in _ranges(offsets):
        g, xe = grad[lo:hi], x[lo:hi]
        x_lora = xe * keep[lo:hi] if keep is not None else xe
        gb = g @ lora_B[e]  # rows x r
        torch.mm(g, weight[e], out=grad_x[lo:hi])
        lora_dx = gb @ lora_A[e]
        grad_x[lo:hi].add_(lora_dx * keep[lo:hi] if keep is not None else lora_dx, alpha=scale)
        torch.mm(gb.t(), x_lora, out=grad_A[e]).mul_(scale)
        torch.mm(g.t(), x_lora @ lora_A[e].t(), out=grad_B[e]).mul_(scale)
        if weight_grad:
            torch.mm(g.t(), xe, out=grad_W[e])
    return grad_x, grad_W, grad_A, grad_B


@_backward.register_fake
def _backward_fake(grad, x, weight, lora_A, lora_B, offsets, scale, dropout, seed, weight_grad):
    grad_W = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return torch.empty_like(x), grad_W, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, offsets, scale, dropout, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, offsets, seed)
    ctx.scale, ctx.dropout = scale, dropout


def _autograd(ctx, grad):
    x, weight, lora_A, lora_B, offsets, seed = ctx.saved_tensors
    grad_x, grad_W, grad_A, grad_B = _backward(grad.contiguous(), x, weight, lora_A, lora_B, offsets, ctx.scale,
                                               ctx.dropout, seed, ctx.needs_input_grad[1])
    return grad_x, (grad_W if ctx.needs_input_grad[1] else None), grad_A, grad_B, None, None, None, None


_forward.register_autograd(_autograd, setup_context=_setup_context)


@torch.library.custom_op("d9d::grouped_lora_merge_", mutates_args=("weight",))
def _merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    experts = weight.shape[0]
    _check("grouped_lora_merge_", None, weight, lora_A, lora_B, torch.zeros(experts, dtype=torch.int64))
    for e in range(experts):  # one expert at a time: never an E x out x in temporary
        weight[e].addmm_(lora_B[e].to(weight.dtype), lora_A[e].to(weight.dtype), alpha=scale)


@_merge.register_fake
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
        seed: The dropout seed (a CPU int64 tensor of one element); drawn from torch's generator when ``None``.
            Share one seed between calls that must draw the same mask.

    Returns:
        ``(rows, out)``.
    """
    if lora_A.dtype != x.dtype:
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)
    p = float(dropout) if training and dropout > 0 else 0.0
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu")
    return _forward(x, weight, lora_A, lora_B, offsets, float(scale), p, seed)


@torch.no_grad()
def grouped_lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    """``W_e += scale * B_e A_e`` for every expert, in place, one expert at a time; shard-local on DTensors whose
    three tensors are all sharded along the expert dimension (FSDP2) or all replicated."""
    torch.ops.d9d.grouped_lora_merge_(weight, lora_A, lora_B, float(scale))
