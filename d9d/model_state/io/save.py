"""Writing a model (sharded or not) as a Hugging Face-layout checkpoint: several ranks write at once, each tensor
gathered only onto the rank that writes it, atomically."""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from d9d.model_state.io.atomic import atomic_directory, check_destination
from d9d.model_state.io.layout import INDEX_FILE, SINGLE_FILE, shard_file_name
from d9d.model_state.io.model_keys import alias_groups, model_state
from d9d.model_state.io.pieces import Runs, blocks, check_placements, chunks, is_shard_like, local_runs, piece_shape
from d9d.model_state.mapper import ModelStateMapper, StateGroup
from d9d.model_state.mapper.abc import group_order_key
from d9d.model_state.mapper.adapters import identity_mapper_from_keys

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class _PlannedFile:
    name: str
    groups: list[StateGroup]
    weight_bytes: int


@dataclasses.dataclass(frozen=True)
class _Piece:
    """What one rank holds of a DTensor: its runs of global indices, and the mesh it is placed on."""

    runs: Runs
    mesh_shape: tuple[int, ...]
    mesh_ranks: tuple[int, ...]
    shard_like: tuple[bool, ...]  # per mesh dim: whether its placement splits the tensor


def save_model_state(
    dest_dir: str | Path,
    mapper: ModelStateMapper | None,
    model: nn.Module,
    shard_size_gb: float = 4.0,
    show_progress: bool = True,
    config: object | None = None,
) -> None:
    """Writes ``model``'s state, through ``mapper``, as a Hugging Face checkpoint in ``dest_dir``.

    Works in a single process, and called by every rank when a process group is initialized (it is collective
    even for an unsharded model). Groups are walked in one deterministic order (layers consecutive) and packed into
    files of at most ``shard_size_gb`` (a group is never split), named ``model-00001-of-00003.safetensors`` plus
    ``model.safetensors.index.json``, or a single ``model.safetensors``. File ``i`` belongs to rank
    ``i % world_size``, and files are written in rounds of ``world_size``: in a round every rank builds and writes
    its own file at the same time.

    A file's owner receives each DTensor input of its groups from the ranks holding its pieces, one replica group
    only (the owner's own replica where it holds one: ``Replicate`` mesh dims are never gathered over), for any
    placement (``Shard``, ``_StridedShard``, uneven splits, 1-D or N-D meshes). The transfers of one step (one
    group per file of the round) go through ``torch.distributed.batch_isend_irecv``: point-to-point on the default
    process group's communicator (on NCCL grouped launches, no new communicators). Blocks of rows arrive straight
    in their place in the owner's tensor, all in one exchange; other pieces (columns, 2-D splits) follow in chunks
    of at most 4 MiB through one reusable buffer, one chunk per owner and exchange. Nobody else ever holds the full
    tensor (``full_tensor()`` is never called). The owner applies the mapper and keeps the result until its file
    is written. So a rank holds its shards plus at most one file's tensors and one group's gathered inputs (and a
    4 MiB buffer); with a small ``shard_size_gb`` the export proceeds about one layer per rank at a time. A one-time
    ``all_gather_object`` shares which global indices each rank holds (a few integers per tensor and rank).

    The export is atomic (:func:`d9d.model_state.io.atomic.atomic_directory`): files, index and ``config.json``
    go to a temporary sibling folder ``.<name>.d9d-tmp``, which rank 0 renames to ``dest_dir`` (replacing an
    existing folder) after every rank finished. A run killed midway leaves no ``dest_dir`` that looks complete,
    and the next run removes its stale temporary folder. ``dest_dir``'s parent must be one file system shared by
    all ranks.

    Args:
        dest_dir: The checkpoint folder to create.
        mapper: Maps ``model``'s state keys to the checkpoint's keys; ``None`` writes the state as it is (one name
            per tied tensor).
        model: The model; on every rank when it is sharded.
        shard_size_gb: The largest file size, in GB (10^9 bytes).
        show_progress: Show a progress bar on the main rank.
        config: Written as ``config.json`` next to the weights, so that ``from_pretrained`` loads the folder: a
            ``transformers`` ``PretrainedConfig`` (anything with ``save_pretrained(folder)``, e.g.
            ``model.config``) or a JSON-serializable mapping. ``None`` writes none.

    Raises:
        ValueError: If ``mapper`` reads a key the model's state lacks (the message names it), a tensor is placed
            as ``Partial``, ``shard_size_gb`` is not positive, or ``dest_dir`` is an existing file or holds the
            working directory; nothing is written then.
        TypeError: If ``config`` is neither a mapping nor has ``save_pretrained``.
    """
    if shard_size_gb <= 0:
        raise ValueError(f"shard_size_gb must be positive, got {shard_size_gb}")
    if config is not None and not (isinstance(config, Mapping) or hasattr(config, "save_pretrained")):
        raise TypeError(f"save_model_state: config must be a mapping or have save_pretrained(), got "
                        f"{type(config).__name__}")
    dest = Path(dest_dir)
    check_destination(dest)
    state = model_state(model)
    if mapper is None:
        mapper = identity_mapper_from_keys(aliases[0] for aliases in alias_groups(state))
    missing = sorted(mapper.input_keys() - state.keys())
    if missing:
        raise ValueError(f"save_model_state: the mapper reads key(s) the model's state lacks: {missing[:10]}")
    for key in sorted(mapper.input_keys()):
        if isinstance(state[key], DTensor):
            check_placements(key, state[key])
    files = _plan_files(mapper, state, int(shard_size_gb * 1e9))

    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    pieces = _share_pieces(state, mapper.input_keys()) if distributed else {}
    with atomic_directory(dest, collective=True) as tmp:
        progress = tqdm(total=sum(len(f.groups) for f in files), desc=f"saving {dest.name}", unit="group",
                        disable=not (show_progress and rank == 0))
        for start in range(0, len(files), world):
            _write_round(files[start:start + world], mapper, state, pieces, tmp, progress)
        progress.close()
        if rank == 0:  # the index depends on the plan only; the rename waits for every file
            if len(files) > 1:
                weight_map = {k: f.name for f in files for group in f.groups for k in group.outputs}
                index = {"metadata": {"total_size": sum(f.weight_bytes for f in files)},
                         "weight_map": dict(sorted(weight_map.items()))}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            if isinstance(config, Mapping):
                (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
            elif config is not None:
                config.save_pretrained(tmp)


@torch.no_grad()
def _write_round(files: list[_PlannedFile], mapper: ModelStateMapper, state: dict[str, torch.Tensor],
                 pieces: dict[str, list[_Piece | None]], folder: Path, progress: tqdm) -> None:
    """Rank ``k`` builds and writes ``files[k]``; every rank sends the pieces the owners need, step by step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = files[rank] if rank < len(files) else None
    kept: dict[str, torch.Tensor] = {}
    if mine is not None and not mine.groups:  # a model without state: one empty file
        save_file(kept, folder / mine.name, metadata={"format": "pt"})
    for step in range(max(len(f.groups) for f in files)):
        work = [(owner, f.groups[step]) for owner, f in enumerate(files) if step < len(f.groups)]
        inputs = _gather_step(work, state, pieces)
        if inputs is not None:
            for key, value in mapper.apply(inputs).items():
                if isinstance(value, DTensor):
                    raise TypeError(f"save_model_state: the mapper produced a DTensor for {key!r}")
                kept[key] = _owned_cpu(value, kept)
            del inputs
            if mine is not None and step == len(mine.groups) - 1:
                save_file(kept, folder / mine.name, metadata={"format": "pt"})
                kept = {}
        progress.update(len(work))


# A block of a piece that is not contiguous in the full tensor (columns, 2-D splits) is received in chunks of at
# most this many bytes into one reusable buffer per owner, each copied into place: staging costs this much, not the
# piece's size.
_CHUNK_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class _Message:
    """One block (or chunk of a block) of ``tensor`` that ``source`` sends to ``owner``."""

    source: int
    owner: int
    tensor: DTensor
    full: torch.Tensor | None  # the owner's full tensor, on the owner only
    block: tuple[tuple[slice, ...], tuple[slice, ...]]  # (global slices, local slices)


def _gather_step(work: list[tuple[int, StateGroup]], state: dict[str, torch.Tensor],
                 pieces: dict[str, list[_Piece | None]]) -> dict[str, torch.Tensor] | None:
    """Gathers each group's inputs onto its owner with batched point-to-point exchanges; returns this rank's
    group's full inputs (``None`` if it owns none). Every rank walks ``work`` in the same order and lists every
    message of the step, so the messages of each pair of ranks match one to one (the tag numbers them).

    A piece goes block by block (one block unless ``_StridedShard`` splits it). Blocks that are contiguous in the
    full tensor (rows) are received straight into their place, in one exchange. The others are cut into chunks
    of at most ``_CHUNK_BYTES`` that go in rounds, one exchange each: round ``k`` carries every owner's ``k``-th
    chunk, so an owner receives one chunk at a time into one buffer and copies it into place."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    direct: list[_Message] = []
    staged: dict[int, list[_Message]] = {}  # per owner, its chunks in order
    mine: dict[str, torch.Tensor] | None = None
    for owner, group in work:
        if owner == rank:
            mine = {}
        for key in sorted(group.inputs):
            t = state[key]
            if not isinstance(t, DTensor):  # the same on every rank: the owner uses its own
                if owner == rank:
                    mine[key] = t.detach()
                continue
            full = t.to_local().new_empty(t.shape) if owner == rank else None
            if full is not None:
                mine[key] = full
            for source in _sources(pieces[key], owner):
                runs = pieces[key][source].runs
                if source == owner:
                    if rank == owner:
                        _place(full, t.to_local(), runs)
                    continue
                if piece_shape(runs).count(0):  # an empty piece (more ranks than rows): nothing to send
                    continue
                for block in blocks(runs):
                    if torch.empty(t.shape, device="meta")[block[0]].is_contiguous():
                        direct.append(_Message(source, owner, t, full, block))
                    else:
                        parts = chunks(block, t.element_size(), _CHUNK_BYTES)
                        staged.setdefault(owner, []).extend(_Message(source, owner, t, full, c) for c in parts)
    tag = _exchange(direct, 0)
    buffer = None
    if rank in staged:
        size = max(m.full[m.block[0]].nbytes for m in staged[rank])
        buffer = torch.empty(size, dtype=torch.uint8, device=staged[rank][0].full.device)
    for k in range(max(map(len, staged.values()), default=0)):
        tag = _exchange([queue[k] for queue in staged.values() if k < len(queue)], tag, buffer)
    return mine


def _exchange(messages: list[_Message], tag: int, buffer: torch.Tensor | None = None) -> int:
    """Sends and receives this rank's ``messages`` in one ``batch_isend_irecv``, tagged from ``tag`` on; returns
    the next tag. Receives straight into the owner's full tensor, or, given a ``buffer`` (at most one message per
    owner then), into it and copies into place."""
    if not messages:
        return tag
    rank = dist.get_rank()
    ops: list[dist.P2POp] = []
    unpack: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in messages:
        if rank == m.source:  # a view when the local tensor is contiguous (the usual case)
            ops.append(dist.P2POp(dist.isend, m.tensor.to_local()[m.block[1]].contiguous(), m.owner, tag=tag))
        elif rank == m.owner:
            place = m.full[m.block[0]]
            into = place if buffer is None else buffer[:place.nbytes].view(place.dtype).view(place.shape)
            ops.append(dist.P2POp(dist.irecv, into, m.source, tag=tag))
            if buffer is not None:
                unpack.append((place, into))
        tag += 1
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for place, into in unpack:
        place.copy_(into)
    return tag


def _place(full: torch.Tensor, piece: torch.Tensor, runs: Runs) -> None:
    for global_index, local_index in blocks(runs):
        full[global_index].copy_(piece[local_index])


def _sources(holders: list[_Piece | None], owner: int) -> list[int]:
    """The ranks whose pieces tile the tensor, on the owner's mesh (the lowest holder's when the owner holds no
    piece): every coordinate of the sharding mesh dims, and on the replica dims the owner's coordinate (0 when
    the owner is not in the mesh). Decided from the shared pieces alone, so every rank reaches the same list even
    when ranks hold the tensor on different sub-meshes (a TP mesh per replica)."""
    ref = holders[owner] or next(p for p in holders if p is not None)
    ranks = torch.tensor(ref.mesh_ranks).view(ref.mesh_shape)
    where = (ranks == owner).nonzero()
    coordinate = where[0].tolist() if len(where) else [0] * ranks.ndim
    index = tuple(slice(None) if shard_like else coordinate[i] for i, shard_like in enumerate(ref.shard_like))
    return ranks[index].flatten().tolist()


def _share_pieces(state: dict[str, torch.Tensor], keys: frozenset[str]) -> dict[str, list[_Piece | None]]:
    """For each DTensor in ``keys``, what every rank holds of it (one ``all_gather_object`` of a few integers per
    tensor; meshes are sent once per rank)."""
    meshes: dict[tuple, int] = {}
    own: dict[str, tuple[Runs, int] | None] = {}
    for key in sorted(keys):
        t = state[key]
        if not isinstance(t, DTensor):
            continue
        if t.device_mesh.get_coordinate() is None:
            own[key] = None
            continue
        mesh = (tuple(t.device_mesh.mesh.shape), tuple(t.device_mesh.mesh.flatten().tolist()),
                tuple(is_shard_like(p) for p in t.placements))
        own[key] = (local_runs(t), meshes.setdefault(mesh, len(meshes)))
    every: list[tuple[list[tuple], dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (list(meshes), own))
    pieces: dict[str, list[_Piece | None]] = {}
    for key in own:
        holders = []
        for rank_meshes, rank_own in every:
            held = rank_own.get(key)
            holders.append(None if held is None else _Piece(held[0], *rank_meshes[held[1]]))
        pieces[key] = holders
    return pieces


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
