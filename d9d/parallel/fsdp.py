"""FSDP2 (``fully_shard``) applied to a model after PEFT injection: per block, then the root."""

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

BlockSpec = type[nn.Module] | Sequence[type[nn.Module]] | Callable[[str, nn.Module], bool]


def shard_model(
    model: nn.Module,
    blocks: BlockSpec,
    mesh: DeviceMesh | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> FSDPModule:
    """Applies ``fully_shard`` to every block of ``model`` (innermost first), then to ``model`` itself.

    Call it after ``inject_peft_and_freeze`` (so adapters are sharded with their block and ``requires_grad`` is
    final) and before building the optimizer. The model may live on the ``meta`` device (see
    :func:`d9d.parallel.materialize_model`).

    Mixed dtypes: FSDP2 all-gathers parameters of different dtypes in one group (it falls back to a byte buffer),
    but it requires the *trainable* parameters of a group to share one dtype, because their gradients are
    reduce-scattered together. ``float32`` LoRA adapters on a frozen ``bfloat16`` base therefore work as they are.
    When a block trains parameters of several dtypes (``float32`` adapters plus ``bfloat16`` norms unfrozen by
    FullTune), the submodules holding the minority dtypes get their own ``fully_shard`` group; the block keeps the
    dtype with the most trainable elements. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)`` additionally computes everything in ``bfloat16`` while keeping ``float32`` master
    adapters and gradients reduction; it does not lift the one-trainable-dtype-per-group rule.

    Args:
        model: The (injected) model.
        blocks: Which submodules form a sharding unit: a module class, a sequence of classes, or a predicate
            ``(qualified_name, module) -> bool``. Typically the transformer layer class.
        mesh: The data-parallel mesh: 1-D (FSDP), or 2-D ``(replicate, shard)`` for HSDP (replicas of the
            sharded model, gradients all-reduced across them); ``ParallelMesh.dp`` gives the right one. ``None``
            uses all ranks of the default process group.
        mp_policy: FSDP2's mixed-precision policy; ``None`` computes in each parameter's own dtype.
        reshard_after_forward: Free the gathered parameters after forward (re-gathered in backward), trading
            communication for memory.

    Returns:
        ``model``, now an ``FSDPModule``.

    Raises:
        ValueError: If no submodule is a block, or one module directly holds trainable parameters of several dtypes
            (no split can make its group uniform); the message names the module.
    """
    is_block = _as_predicate(blocks)
    selected = [(name, m) for name, m in model.named_modules() if name and is_block(name, m)]
    if not selected:
        raise ValueError(f"shard_model: no submodule of {type(model).__name__} matches the block spec {blocks!r}")
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "reshard_after_forward":
              reshard_after_forward}
    # named_modules is pre-order, so reversed it visits nested blocks before the blocks that contain them.
    for name, block in reversed(selected):
        _shard_uniform(block, name, kwargs)
    _shard_uniform(model, "<root>", kwargs)
    return model


def _as_predicate(blocks: BlockSpec) -> Callable[[str, nn.Module], bool]:
    if isinstance(blocks, type):
        return lambda _name, m: isinstance(m, blocks)
    if isinstance(blocks, Sequence):
        types = tuple(blocks)
        if not all(isinstance(t, type) for t in types):
            raise TypeError(f"shard_model: blocks must be module classes or a predicate, got {blocks!r}")
        return lambda _name, m: isinstance(m, types)
    if callable(blocks):
        return blocks
    raise TypeError(f"shard_model: blocks must be module classes or a predicate, got {blocks!r}")


def _free_params(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
    """Parameters of ``module`` that no already-sharded submodule manages."""
    managed = {id(p) for sub in module.modules() if sub is not module and isinstance(sub, FSDPModule)
               for p in sub.parameters()}
    return [p for p in module.parameters(recurse=recurse) if id(p) not in managed]


def _trainable_numel_by_dtype(module: nn.Module) -> dict[torch.dtype, int]:
    numel: dict[torch.dtype, int] = {}
    for p in _free_params(module):
        if p.requires_grad:
            numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
    return numel


def _shard_uniform(module: nn.Module, name: str, kwargs: dict) -> None:
    """``fully_shard(module)``, first splitting off submodules whose trainable dtype differs from the majority."""
    numel = _trainable_numel_by_dtype(module)
    if len(numel) > 1:
        keep = max(numel, key=lambda d: (numel[d], str(d)))
        for child_name, child in module.named_children():
            if set(_trainable_numel_by_dtype(child)) - {keep}:
                _shard_uniform(child, f"{name}.{child_name}", kwargs)
        remaining = _trainable_numel_by_dtype(module)
        if len(remaining) > 1:
            raise ValueError(
                f"shard_model: module {name!r} directly holds trainable parameters of dtypes "
                f"{sorted(map(str, remaining))}; FSDP2 needs one trainable dtype per sharding group"
            )
    fully_shard(module, **kwargs)
