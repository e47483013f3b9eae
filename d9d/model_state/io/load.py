"""Streaming a Hugging Face-layout checkpoint into a model (sharded or not) through a mapper, each rank reading
only what it keeps."""

import contextlib
import dataclasses
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from d9d.dtensor import is_meta, local_part
from d9d.model_state.io.layout import INDEX_FILE, SINGLE_FILE, TensorInfo, read_header, read_layout
from d9d.model_state.io.model_keys import adapter_state_keys, alias_groups, model_state
from d9d.model_state.io.pieces import blocks, check_placements, local_runs
from d9d.model_state.mapper import ModelStateMapper, StateGroup
from d9d.model_state.mapper.abc import group_order_key
from d9d.parallel.process_group import is_main_rank

_MAX_LISTED = 10


@dataclasses.dataclass
class LoadStats:
    """What one rank read during :func:`load_model_state`.

    Attributes:
        bytes_read: Tensor bytes requested from the files: the slices of pass-through groups plus every input of
            the other groups, whole.
        checkpoint_bytes: Bytes of every checkpoint tensor the mapper reads (what a rank reading whole tensors
            would have read).
        sliced_tensors: Model tensors filled from slices of their source (pass-through groups).
        whole_tensors: Checkpoint tensors read whole (inputs of groups that compute their outputs).
    """

    bytes_read: int = 0
    checkpoint_bytes: int = 0
    sliced_tensors: int = 0
    whole_tensors: int = 0


def load_model_state(
    src_dir: str | Path,
    mapper: ModelStateMapper,
    device: torch.device | str,
    model: nn.Module,
    show_progress: bool = True,
    only_keys: Collection[str] | None = None,
) -> LoadStats:
    """Loads a checkpoint into ``model`` in place, streaming one mapper group at a time.

    The whole plan is validated first, on every rank, from the file headers alone and before any tensor is read:
    every key the mapper reads exists in the checkpoint; every checkpoint key is read; every key the mapper
    produces is a key of ``model``'s state and every key of the model is produced (except PEFT adapter parameters,
    which a pretrained checkpoint lacks and which keep their initialization, and tied weights, of which one name
    suffices); and the mapper, dry-run on ``meta`` tensors of the header shapes, gives each key the model's full
    (global) shape and a dtype that casts to the model's without loss (floating point to floating point; any
    other dtype must match exactly: an integer or bool tensor is never cast into a float parameter). Every rank
    reaches the same verdict without communicating, so a bad checkpoint fails everywhere and nothing hangs.

    Then each group is read and copied into the model, cast to the model tensor's dtype; the files are
    memory-mapped and closed after each group. A group that passes its inputs through (identity, rename,
    duplicate: nearly all of a checkpoint) reads, for a DTensor parameter, only the rows and columns of this
    rank's local shard, as safetensors slices, straight into the shard: the bytes a rank reads fall as
    1 / (ranks splitting the tensor), for every placement (``Shard``, ``_StridedShard``, uneven splits; replicas
    read the same slices). A group that computes its outputs reads its inputs whole (on ``device``), applies the
    mapper and copies this rank's part of each output. Loading communicates nothing and never materializes the
    whole model. Call it on every rank with the same arguments.

    Args:
        src_dir: The checkpoint folder (``model.safetensors``, or shards plus ``model.safetensors.index.json``),
            or one ``.safetensors`` file of any name (a PEFT adapter's ``adapter_model.safetensors``).
        mapper: Maps checkpoint keys to ``model``'s state keys (see
            :func:`d9d.model_state.io.checkpoint_mapper_for` for a PEFT-injected model).
        device: Where the inputs of computing groups go before the mapper runs (``"cpu"``, or the GPU).
        model: The model to fill, with its parameters allocated (see ``d9d.parallel.materialize_model``).
        show_progress: Show a progress bar on the main rank.
        only_keys: The model keys this load fills (for example the adapter parameters of a PEFT adapter); every
            other model tensor is neither expected from the mapper nor touched. ``None``: the whole model state.

    Returns:
        What this rank read.

    Raises:
        FileNotFoundError: If the folder has no checkpoint or its index names a missing file.
        ValueError: If the plan does not validate; the message names each offending key (and its file) or file.
    """
    src, layout = _read_source(Path(src_dir))
    targets = model_state(model)
    optional = adapter_state_keys(model)
    if only_keys is not None:
        wanted = set(only_keys)
        unknown = sorted(wanted - targets.keys())
        if unknown:
            raise ValueError(f"cannot load checkpoint {src}: only_keys names key(s) the model does not have: "
                             f"{_listed(unknown)}")
        targets, optional = {k: v for k, v in targets.items() if k in wanted}, frozenset()
    groups = _validate_plan(src, layout, mapper, targets, optional)

    def first_file(group: StateGroup) -> str:
        return min(layout[k].file for k in group.inputs) if group.inputs else ""

    groups.sort(key=lambda g: (first_file(g), group_order_key(g)))
    stats = LoadStats(checkpoint_bytes=sum(layout[k].nbytes for g in groups for k in g.inputs))
    progress = tqdm(groups, desc=f"loading {src.name}", unit="group", disable=not (show_progress and is_main_rank()))
    for group in progress:
        _load_group(src, layout, group, device, mapper, targets, stats)
    return stats


def _read_source(src: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """The folder the layout's file names are relative to, and the layout of a checkpoint folder or one file."""
    if src.is_file():
        return src.parent, {k: TensorInfo(src.name, shape, dtype) for k, (shape, dtype) in read_header(src).items()}
    return src, read_layout(src)


@torch.no_grad()
def _load_group(src: Path, layout: dict[str, TensorInfo], group: StateGroup, device: torch.device | str,
                mapper: ModelStateMapper, targets: dict[str, torch.Tensor], stats: LoadStats) -> None:
    # A function of its own so that every full tensor it touched is freed when it returns.
    sources = mapper.passthrough_sources(group)
    with _open_files(src, layout, group) as handles:
        try:
            if sources is not None:
                for out_key, in_key in sorted(sources.items()):
                    stats.bytes_read += _read_into(handles[layout[in_key].file], in_key, targets[out_key])
                    stats.sliced_tensors += 1
                return
            inputs = {k: handles[layout[k].file].get_tensor(k).to(device) for k in group.inputs}
        except SafetensorError as e:
            raise ValueError(f"cannot read {sorted(group.inputs)} from {_files(layout, group)} under {src}: {e}") from e
    stats.bytes_read += sum(layout[k].nbytes for k in group.inputs)
    stats.whole_tensors += len(inputs)
    outputs = mapper.apply(inputs)
    del inputs
    for key, value in outputs.items():
        _copy_into(targets[key], value, key)


@contextlib.contextmanager
def _open_files(src: Path, layout: dict[str, TensorInfo], group: StateGroup) -> Iterator[dict[str, object]]:
    # Files are opened per group: safetensors memory-maps them, and the touched pages stay resident until the
    # file is closed, so a file kept open for its whole walk would cost its full size in memory.
    files = _files(layout, group)
    with contextlib.ExitStack() as stack:
        try:
            handles = {f: stack.enter_context(safe_open(src / f, framework="pt", device="cpu")) for f in files}
        except SafetensorError as e:
            raise ValueError(f"cannot open {files} under {src}: {e}") from e
        yield handles


def _files(layout: dict[str, TensorInfo], group: StateGroup) -> list[str]:
    return sorted({layout[k].file for k in group.inputs})


def _read_into(handle, key: str, target: torch.Tensor) -> int:
    """Copies checkpoint tensor ``key`` into ``target`` (for a DTensor, its local shard only, read as slices);
    returns the bytes read."""
    local = target.to_local() if isinstance(target, DTensor) else target
    if target.ndim == 0:
        value = handle.get_tensor(key)
        local.copy_(value)
        return value.numel() * value.element_size()
    runs = local_runs(target) if isinstance(target, DTensor) else tuple(((0, n),) for n in target.shape)
    tensor_slice, read = handle.get_slice(key), 0
    for global_index, local_index in blocks(runs):
        block = tensor_slice[global_index]
        local[local_index].copy_(block)
        read += block.numel() * block.element_size()
    return read


def _copy_into(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if isinstance(value, DTensor):
        raise TypeError(f"{key!r}: the mapper produced a DTensor; mappers produce full tensors and the loader "
                        "keeps each rank's part")
    if isinstance(target, DTensor):
        target.to_local().copy_(local_part(value, target))
    else:
        target.copy_(value)


def _validate_plan(src: Path, layout: dict[str, TensorInfo], mapper: ModelStateMapper,
                   targets: dict[str, torch.Tensor], optional: frozenset[str]) -> list[StateGroup]:
    groups = list(mapper.state_dependency_groups())
    files = sorted({info.file for info in layout.values()})
    where = src / INDEX_FILE if (src / INDEX_FILE).is_file() else src / (files[0] if len(files) == 1 else SINGLE_FILE)
    problems: list[str] = []

    needed = frozenset().union(*(g.inputs for g in groups))
    missing = sorted(needed - layout.keys())
    if missing:
        problems.append(f"missing key(s) in checkpoint {where}: {_listed(missing)} (the mapper reads them)")
    unexpected = sorted(layout.keys() - needed)
    if unexpected:
        named = [f"{k!r} (in {layout[k].file})" for k in unexpected[:_MAX_LISTED]]
        problems.append(f"unexpected key(s) in checkpoint {src}: {', '.join(named)}"
                        f"{' ...' if len(unexpected) > _MAX_LISTED else ''} (no mapper group reads them)")

    produced = frozenset().union(*(g.outputs for g in groups))
    unknown = sorted(produced - targets.keys())
    if unknown:
        problems.append(f"the mapper produces key(s) the model does not have: {_listed(unknown)}")
    not_loaded = [aliases[0] for aliases in alias_groups(targets)
                  if not produced.intersection(aliases) and not optional.issuperset(aliases)]
    if not_loaded:
        problems.append(f"model key(s) that no mapper group produces: {_listed(not_loaded)}")
    on_meta = sorted(k for k in produced & targets.keys() if is_meta(targets[k]))
    if on_meta:
        problems.append(f"model tensor(s) still on the meta device (a copy into them would be lost): "
                        f"{_listed(on_meta)}; call d9d.parallel.materialize_model first")

    for key in sorted(produced & targets.keys()):
        if isinstance(targets[key], DTensor):
            try:
                check_placements(key, targets[key])
            except ValueError as e:
                problems.append(str(e))

    if not missing:  # shapes: dry-run each group on meta tensors of the header shapes and dtypes
        for group in sorted(groups, key=group_order_key):
            produced_meta = mapper.apply({k: layout[k].meta() for k in group.inputs})
            for key, value in sorted(produced_meta.items()):
                target = targets.get(key)
                if target is None:
                    continue
                origin = f"from {sorted(group.inputs)} in {', '.join(_files(layout, group))}"
                if tuple(value.shape) != tuple(target.shape):
                    problems.append(f"shape mismatch for {key!r}: the checkpoint gives {tuple(value.shape)} "
                                    f"({origin}), the model expects {tuple(target.shape)}")
                if lossy_cast(value.dtype, target.dtype):
                    problems.append(f"lossy dtype for {key!r}: the checkpoint gives {value.dtype} ({origin}), the "
                                    f"model holds {target.dtype}; only floating-point to floating-point casts are "
                                    "done, other dtypes must match")
    if problems:
        raise ValueError(f"cannot load checkpoint {src}:\n  " + "\n  ".join(problems))
    return groups


def lossy_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether copying a ``source`` tensor into a ``target`` one would lose more than floating-point rounding."""
    return source != target and not (source.is_floating_point and target.is_floating_point)


def _listed(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:_MAX_LISTED]) + (" ..." if len(keys) > _MAX_LISTED else "")
