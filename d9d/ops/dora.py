"""DoRA (weight-decomposed LoRA) on the fused LoRA op and the weight-norm ops of ``d9d._C``."""

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

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


@torch.library.register_fake("d9d::dora_forward")
def _dora_forward_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, factor: torch.Tensor, scale: float) -> torch.Tensor:
    torch._check(weight.shape[1] == x.shape[-1], lambda: f"dora_forward: weight must be out x in, got {weight.shape}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("d9d::dora_backward")
def _dora_backward_fake(grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, factor: torch.Tensor,
                        scale: float, need_grad_x: bool) -> tuple[torch.Tensor, ...]:
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), factor.new_empty(factor.shape)


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


# Dtypes in which the fused backward may take DoRA's unscaled output as (y - bias) / factor: in float32 that loses
# about |bias| / |y - bias| ulps of it, a 16-bit y would lose far more (there the bias path keeps z instead).
_EXACT_UNBIAS = (torch.float32, torch.float64)

_SCALE_BLOCK_ELEMENTS = 1 << 16  # rows of dy and z per block of the scaling backward: about 256 KiB of float32 each


class _ScaleColumns(torch.autograd.Function):
    """``y = z * factor + bias`` over the last dim; the backward takes both gradients in one blocked pass.

    Autograd's own ``addcmul`` backward makes three passes over ``N x out`` tensors and allocates one of that size
    (``dy * factor``, then ``dy * z`` and its sum). Here each block of rows of ``dy`` and ``z`` is read once, while
    in cache, for ``dz = dy * factor`` and the block's part of ``dfactor = sum_rows(dy * z)``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(z, factor)
        ctx.has_bias = bias is not None
        return z * factor if bias is None else torch.addcmul(bias, z, factor)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, factor = ctx.saved_tensors
        need_z, need_factor, need_bias = ctx.needs_input_grad
        width = grad_y.shape[-1]
        dy = grad_y.reshape(-1, width)
        z2d = z.reshape(-1, width)
        grad_z = torch.empty_like(dy) if need_z else None
        acc_dtype = torch.float32 if factor.dtype in (torch.bfloat16, torch.float16) else factor.dtype
        grad_factor = torch.zeros(width, dtype=acc_dtype, device=factor.device) if need_factor else None
        step = max(1, _SCALE_BLOCK_ELEMENTS // max(width, 1))
        scratch = dy.new_empty((min(step, dy.shape[0]), width)) if need_factor else None
        for row0 in range(0, dy.shape[0], step):
            block = dy[row0:row0 + step]
            if grad_z is not None:
                torch.mul(block, factor, out=grad_z[row0:row0 + step])
            if grad_factor is not None:
                product = torch.mul(block, z2d[row0:row0 + step], out=scratch[: block.shape[0]])
                grad_factor += product.sum(0, dtype=acc_dtype)
        return (
            None if grad_z is None else grad_z.view(grad_y.shape),
            None if grad_factor is None else grad_factor.to(factor.dtype),
            dy.sum(0) if need_bias and ctx.has_bias else None,
        )


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

    which without dropout (or in eval mode) is ``f * (x W^T + scale x A^T B^T) + b``. On the CPU that is one fused
    op, ``d9d::dora_forward``: ``f`` is folded into the weights with the adapters, for one GEMM whose output is the
    only ``N x out`` tensor, and autograd keeps that output (the backward takes DoRA's unscaled output as
    ``(y - b) / f``, recomputing it from ``x`` where ``f`` is 0; with a bias only in float32 and float64, as a 16-bit
    ``y - b`` would lose too much of it). Elsewhere (CUDA, DTensors, under autocast, whose casts the LoRA op's
    autocast kernel makes) it is the fused LoRA op and one scaling pass (whose backward is
    one blocked pass too); on CUDA the caching allocator makes that pass's extra ``N x out`` tensors cheap, and the
    fused backward's check for zero factors would synchronize. Neither has an ``out x in`` temporary besides the
    fused op's reused fold scratch. With dropout, PEFT's form needs a second pass of the base weight, over
    ``x - d``. Dropout draws from torch's RNG in
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
    # Under autocast the LoRA op computes in the autocast dtype, and so does the scaling, as an nn.Linear would.
    autocast = torch.is_autocast_enabled(x.device.type)
    factor = (magnitude / norm).to(torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
    if training and dropout > 0:
        dropped = F.dropout(x, dropout, training=True)
        adapted = lora_linear(dropped, weight, None, lora_A, lora_B, scale, 0.0, False)
        return _ScaleColumns.apply(adapted, factor, None) + F.linear(x - dropped, weight, bias)
    fused = (x.device.type == "cpu" and not isinstance(x, DTensor) and not isinstance(weight, DTensor)
             and not autocast and weight.dtype == x.dtype
             and (bias is None or x.dtype in _EXACT_UNBIAS))
    if fused:
        return torch.ops.d9d.dora_forward(x, weight, None if bias is None else bias.to(x.dtype), lora_A, lora_B,
                                          factor, float(scale))
    adapted = lora_linear(x, weight, None, lora_A, lora_B, scale, 0.0, False)
    return _ScaleColumns.apply(adapted, factor, None if bias is None else bias.to(factor.dtype))
