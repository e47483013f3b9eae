"""DTensor sharding rules of the LoRA ops: the merge ops run shard-locally, the apply ops under tensor parallelism.

Apply ops (``lora_forward`` / ``lora_backward``), per mesh dimension:

- column-wise (output features split): ``W``, ``B`` and the bias by rows, ``A`` and ``x`` replicated; ``y`` is
  split on its last dim. In the backward, ``dx`` and ``dA`` are partial sums over the ranks.
- row-wise (input features split): ``W`` and ``A`` by columns, ``x`` on its last dim, ``B`` replicated; ``y`` is a
  partial sum. Such a rule cannot add the bias once, so it admits no bias: :func:`lora_forward_dtensor` leaves the
  bias out of the op and adds it after the reduction. In the backward, ``dB`` is a partial sum.
- everything replicated.

Dropout under tensor parallelism: the mask of element ``(row, col)`` of the local ``x`` is a function of
``(seed, row, col)``. Column-wise, every rank holds all of ``x``, so the ranks must share the seed (they draw it
from torch's default generator: seed it identically on the ranks of a tensor-parallel group) and then agree on
every mask. Row-wise, each rank holds a slice of the columns, and keying by the *local* column would give every
rank the same pattern; :func:`lora_forward_dtensor` therefore offsets the seed by the rank's coordinate on each
mesh dim that splits ``x``'s columns, so the slices get independent masks. The backward reads the same (saved)
per-rank seed, so forward and backward masks agree on every rank.
"""

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
from torch.distributed.tensor.experimental import register_sharding

from d9d.ops import _registration  # noqa: F401  (loads d9d._C, which defines the ops)

__all__ = ["lora_forward_dtensor", "tensor_parallel_seed"]

_R = Replicate()
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct coordinates give distinct seeds


def _merge_sharding(weight, lora_A, lora_B, scale):
    # Rows of W pair with rows of B, columns of W with columns of A. Every rule keeps W where it is (the op mutates
    # it), so DTensor only ever moves the small A (r x in) or B (out x r): a merge never gathers a weight.
    return [
        ([], [Replicate(), Replicate(), Replicate(), None]),
        ([], [Shard(0), Replicate(), Shard(0), None]),  # FSDP2: W and B by rows, A gathered
        ([], [Shard(1), Shard(1), Replicate(), None]),  # row-wise TP (input features split): W and A by columns
    ]


register_sharding(torch.ops.d9d.lora_merge_.default)(_merge_sharding)


def _forward_rules(x, weight, bias, lora_A, lora_B, scale, dropout, seed) -> list[list]:
    """Per mesh dim: placements of ``[y, x, weight, bias, A, B, scale, dropout, seed]``."""
    last = x.ndim - 1
    with_bias = bias is not None
    rules = [
        [_R, _R, _R, _R if with_bias else None, _R, _R, None, None, _R],
        [Shard(last), _R, Shard(0), Shard(0) if with_bias else None, _R, Shard(0), None, None, _R],  # column-wise
    ]
    if not with_bias:  # row-wise: the partial sums would each carry the bias
        rules.append([Partial(), Shard(last), Shard(1), None, Shard(1), _R, None, None, _R])
    return rules


def _backward_rules(grad_y, x, weight, lora_A, lora_B, scale, dropout, seed, need_grad_x) -> list[list]:
    """Per mesh dim: placements of ``[dx, dA, dB, grad_y, x, weight, A, B, scale, dropout, seed, need_grad_x]``.

    Without ``need_grad_x`` the op returns an empty ``dx``, which is left replicated.
    """
    last = x.ndim - 1
    tail = [None, None, _R, None]
    return [
        [_R, _R, _R, _R, _R, _R, _R, _R, *tail],
        [Partial() if need_grad_x else _R, Partial(), Shard(0), Shard(last), _R, Shard(0), _R, Shard(0), *tail],
        [Shard(last) if need_grad_x else _R, Shard(1), Partial(), _R, Shard(last), Shard(1), Shard(1), _R, *tail],
    ]


def _register_rules(op: torch._ops.OpOverload, rules) -> None:
    """Registers ``rules`` (a function of the op's arguments, tensors given as their ``DTensorSpec``) as the op's
    DTensor strategy, expanded over every mesh dim.

    ``register_sharding`` does the same but keys its cache on the tensor arguments only, while ``lora_backward``'s
    strategy depends on the bool ``need_grad_x``: here the non-tensor arguments from ``scale`` on are keyed too.
    """
    returns = len(op._schema.returns)

    def strategy(op_schema: OpSchema) -> OpStrategy:
        args = [a.strategies[0].output_spec if isinstance(a, OpStrategy) else a for a in op_schema.args_schema]
        return expand_to_full_mesh_op_strategy(op_schema.get_mesh_from_args(), op_schema, rules(*args),
                                               input_index=returns)

    scale_index = [a.name for a in op._schema.arguments].index("scale")
    DTensor._op_dispatcher.sharding_propagator.register_op_strategy(
        op, strategy, RuntimeSchemaInfo(static_argnum=scale_index, needs_pytree=True))


_register_rules(torch.ops.d9d.lora_forward.default, _forward_rules)
_register_rules(torch.ops.d9d.lora_backward.default, _backward_rules)


def tensor_parallel_seed(x: DTensor, seed: torch.Tensor) -> DTensor:
    """The dropout seed for a DTensor ``x``: ``seed`` where ``x``'s columns are whole, offset per column slice.

    Returned as a DTensor marked replicated on ``x``'s mesh whose local value may differ per rank (by the rank's
    coordinate on the mesh dims that split ``x``'s last dim): DTensor passes a replicated argument to each rank's
    kernel as it is, which is what gives each column slice its own, independent, mask.
    """
    last = x.ndim - 1
    value = int(seed)
    coordinate = x.device_mesh.get_coordinate() or []
    for mesh_dim, placement in enumerate(x.placements):
        if isinstance(placement, Shard) and placement.dim in (last, -1):
            value = (value ^ ((coordinate[mesh_dim] + 1) * _SEED_MIX * (mesh_dim + 1))) & 0x3FFFFFFFFFFFFFFF
    local = torch.tensor(value, dtype=torch.int64)  # 0-dim, on the CPU like every seed
    return DTensor.from_local(local, x.device_mesh, [_R] * x.device_mesh.ndim, run_check=False)


def lora_forward_dtensor(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                         lora_B: torch.Tensor, scale: float, dropout: float, seed: torch.Tensor) -> torch.Tensor:
    """``torch.ops.d9d.lora_forward`` on DTensors: per-slice dropout seeds, and the bias added once.

    When the weight is split by input features (row-wise tensor parallelism) the op yields partial sums; the bias
    is then added after they are reduced.
    """
    if isinstance(x, DTensor) and dropout > 0:
        seed = tensor_parallel_seed(x, seed)
    row_split = isinstance(weight, DTensor) and any(isinstance(p, Shard) and p.dim == 1 for p in weight.placements)
    if bias is None or not row_split:
        return torch.ops.d9d.lora_forward(x, weight, bias, lora_A, lora_B, scale, dropout, seed)
    y = torch.ops.d9d.lora_forward(x, weight, None, lora_A, lora_B, scale, dropout, seed)
    reduced = [_R if p.is_partial() else p for p in y.placements]
    return y.redistribute(y.device_mesh, reduced) + bias
