"""Writing a model (sharded or not) as a Hugging Face-layout checkpoint, streaming and atomically."""

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from tqdm import tqdm

from d9d.dtensor import full_tensor
from d9d.model_state.io.atomic import atomic_directory
from d9d.model_state.io.layout import INDEX_FILE, SINGLE_FILE, group_order_key, shard_file_name
from d9d.model_state.io.model_keys import alias_groups, model_state
from d9d.model_state.mapper import ModelStateMapper, StateGroup
from d9d.model_state.mapper.adapters import identity_mapper_from_keys


@dataclasses.dataclass
class _PlannedFile:
    name: str
    groups: list[StateGroup]
    weight_bytes: int


def save_model_state(
    dest_dir: str | Path,
    mapper: ModelStateMapper | None,
    model: nn.Module,
    shard_size_gb: float = 4.0,
    show_progress: bool = True,
) -> None:
    """Writes ``model``'s state, through ``mapper``, as a Hugging Face checkpoint in ``dest_dir``.

    Works in a single process, and called by every rank on a model with DTensor (FSDP2) parameters. Groups are
    walked in one deterministic order (layers consecutive) and packed into files of at most ``shard_size_gb``
    (a group is never split), named ``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``, or a
    single ``model.safetensors``. File ``i`` belongs to rank ``i % world_size``. For each group, the DTensor inputs
    are gathered onto the file's owner only (every rank takes part), which applies the mapper, keeps the result
    and writes the file when its last group is done. So a rank holds its shards plus at most one file's
    tensors and one group's gathered inputs: with a small ``shard_size_gb`` the export proceeds about one layer at
    a time and no rank ever holds the model.

    The export is atomic (:func:`d9d.model_state.io.atomic.atomic_directory`): files and index go to a temporary
    sibling folder ``.<name>.d9d-tmp``, which rank 0 renames to ``dest_dir`` (replacing an existing one) after
    every rank finished. A run killed midway leaves no ``dest_dir`` that looks complete, and the next run removes
    its stale temporary folder. ``dest_dir``'s parent must be one file system shared by all ranks. Write other
    files (config, tokenizer) into ``dest_dir`` after this returns.

    Args:
        dest_dir: The checkpoint folder to create.
        mapper: Maps ``model``'s state keys to the checkpoint's keys; ``None`` writes the state as it is (one name
            per tied tensor).
        model: The model; on every rank when it is sharded.
        shard_size_gb: The largest file size, in GB (10^9 bytes).
        show_progress: Show a progress bar on the main rank.

    Raises:
        ValueError: If ``mapper`` reads a key the model's state lacks (the message names it) or ``shard_size_gb`` is
            not positive.
    """
    if shard_size_gb <= 0:
        raise ValueError(f"shard_size_gb must be positive, got {shard_size_gb}")
    state = model_state(model)
    if mapper is None:
        mapper = identity_mapper_from_keys(aliases[0] for aliases in alias_groups(state))
    missing = sorted(mapper.input_keys() - state.keys())
    if missing:
        raise ValueError(f"save_model_state: the mapper reads key(s) the model's state lacks: {missing[:10]}")
    files = _plan_files(mapper, state, int(shard_size_gb * 1e9))

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dest = Path(dest_dir)
    total_groups = sum(len(f.groups) for f in files)
    with atomic_directory(dest, collective=True) as tmp:
        progress = tqdm(total=total_groups, desc=f"saving {dest.name}", unit="group",
                        disable=not (show_progress and rank == 0))
        weight_map: dict[str, str] = {}
        for i, planned in enumerate(files):
            _write_file(planned, mapper, state, tmp, owner=i % world, progress=progress)
            weight_map.update((k, planned.name) for group in planned.groups for k in group.outputs)
        progress.close()
        if rank == 0 and len(files) > 1:  # the index depends on the plan only; the rename waits for every file
            index = {"metadata": {"total_size": sum(f.weight_bytes for f in files)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@torch.no_grad()
def _write_file(planned: _PlannedFile, mapper: ModelStateMapper, state: dict[str, torch.Tensor], folder: Path,
                owner: int, progress: tqdm) -> None:
    """Walks the file's groups, gathering DTensors onto the file's owner (every rank takes part); the owner writes."""
    is_owner = not dist.is_initialized() or dist.get_rank() == owner
    kept: dict[str, torch.Tensor] = {}
    for group in planned.groups:
        _gather_group(group, mapper, state, owner, kept if is_owner else None)
        progress.update(1)
    if is_owner:
        save_file(kept, folder / planned.name, metadata={"format": "pt"})


def _gather_group(group: StateGroup, mapper: ModelStateMapper, state: dict[str, torch.Tensor], owner: int,
                  kept: dict[str, torch.Tensor] | None) -> None:
    # A function of its own so that the gathered tensors are freed on return unless ``kept`` holds them.
    inputs = {k: _gather_to_owner(state[k], owner) for k in sorted(group.inputs)}  # collective: same order everywhere
    if kept is not None:
        for key, value in mapper.apply(inputs).items():
            kept[key] = _owned_cpu(full_tensor(value), kept)


def _gather_to_owner(t: torch.Tensor, owner: int) -> torch.Tensor | None:
    """The full tensor on rank ``owner`` (``None`` elsewhere): only the owner ever holds it.

    Row-sharded DTensors on a 1-D mesh over all ranks (FSDP2's layout) are sent to the owner, which receives them
    into one buffer; other layouts fall back to ``full_tensor()`` on every rank.
    """
    if not isinstance(t, DTensor):
        return t
    mesh = t.device_mesh
    # The fast path addresses ranks by their place in the mesh: only when that is their global rank.
    if tuple(t.placements) != (Shard(0),) or mesh.mesh.tolist() != list(range(dist.get_world_size())):
        full = t.full_tensor()
        return full if dist.get_rank() == owner else None
    world, rows = mesh.size(), t.shape[0]
    per_rank = -(-rows // world)  # Shard(0) chunks like torch.chunk: every rank but the tail ones holds per_rank
    local = t.to_local()
    if local.shape[0] != per_rank:
        padded = local.new_zeros((per_rank, *local.shape[1:]))
        padded[: local.shape[0]] = local
        local = padded
    local = local.contiguous()
    # Point-to-point straight into the owner's buffer: gloo's ``gather`` would stage a second full copy.
    if dist.get_rank() != owner:
        dist.send(local, dst=owner)
        return None
    buffer = local.new_empty((per_rank * world, *local.shape[1:]))
    for source, chunk in enumerate(buffer.chunk(world)):
        if source == owner:
            chunk.copy_(local)
        else:
            dist.recv(chunk, src=source)
    return buffer[:rows]


def _plan_files(mapper: ModelStateMapper, state: dict[str, torch.Tensor], limit: int) -> list[_PlannedFile]:
    """Packs groups, in order, into files of at most ``limit`` bytes, sized by dry-running on ``meta`` tensors."""
    planned: list[tuple[list[StateGroup], int]] = [([], 0)]
    for group in sorted(mapper.state_dependency_groups(), key=group_order_key):
        meta = {k: torch.empty(state[k].shape, dtype=state[k].dtype, device="meta") for k in group.inputs}
        size = sum(v.numel() * v.element_size() for v in mapper.apply(meta).values())
        groups, used = planned[-1]
        if groups and used + size > limit:
            planned.append(([], 0))
            groups, used = planned[-1]
        groups.append(group)
        planned[-1] = (groups, used + size)
    count = len(planned)
    return [_PlannedFile(name=SINGLE_FILE if count == 1 else shard_file_name(i, count), groups=g, weight_bytes=b)
            for i, (g, b) in enumerate(planned)]


def _owned_cpu(t: torch.Tensor, kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """``t`` on the CPU, contiguous, and sharing no storage with ``kept`` (safetensors refuses shared tensors)."""
    t = t.detach().to("cpu").contiguous()
    ptr = t.untyped_storage().data_ptr()
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if not whole or any(v.untyped_storage().data_ptr() == ptr for v in kept.values()):
        t = t.clone()
    return t
