"""Adapter checkpoints as safetensors + JSON: trainable parameters, optimizer state and step, loaded without pickle.

A checkpoint is a folder ``step_<N>`` holding

- ``checkpoint.json`` (rank 0): the step, the world size, the run's PEFT config, every trained parameter's shape and
  dtype, the optimizer's hyper-parameters and per-parameter state layout, and where each rank's parts sit;
- ``rank_<r>.safetensors`` (rank r): this rank's part of every trained tensor and of its optimizer state.

Nothing in it can run code when loaded (no pickle, no ``torch.load``), so resuming from a folder someone else
wrote is safe. Each rank writes only its own shards, with their global offsets: a fully-tuned large module
(optimizer state is twice its size) is never gathered on one rank, and with the same world size a rank reads back
only its own file; with another world size each rank reads just the parts that overlap its new shard. The folder
is written under a temporary name and renamed by rank 0 once every rank finished, so an interrupted save never
looks complete.
"""

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from d9d.finetune.tensor_parts import Part, PartReader, local_view, writes_part
from d9d.model_state.io.atomic import atomic_directory
from d9d.parallel import barrier, is_main_rank

FORMAT = "d9d-adapter-checkpoint/1"
META_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"step_(\d{8})")


def rank_file(rank: int) -> str:
    """The file that holds ``rank``'s parts."""
    return f"rank_{rank:05d}.safetensors"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _trained(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_names(optimizer: torch.optim.Optimizer, trained: dict[str, nn.Parameter]) -> list[str]:
    """The names of the optimizer's parameters, in its own order (its state dict numbers them so)."""
    name_of = {id(p): name for name, p in trained.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = [i for i, p in enumerate(params) if id(p) not in name_of]
    if unknown:
        raise ValueError(f"the optimizer holds {len(unknown)} parameter(s) that are not trainable parameters of the "
                         "model; a checkpoint names parameters by their model name")
    return [name_of[id(p)] for p in params]


def _jsonable(value, where: str):
    try:
        json.dumps(value)
    except TypeError as e:
        raise ValueError(f"cannot checkpoint {where}: {value!r} is not a JSON value") from e
    return value


def _state_layout(optimizer, names, trained) -> tuple[dict, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state as JSON (scalars inline, tensors described) and its tensors by key."""
    layout, tensors = {}, {}
    for name in names:
        param = trained[name]
        entries = {}
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                sharded = isinstance(value, DTensor)
                like_param = value.shape == param.shape and sharded == isinstance(param, DTensor)
                if sharded and not like_param:
                    raise ValueError(f"cannot checkpoint optimizer state {key!r} of {name!r}: a DTensor not laid "
                                     "out like its parameter")
                entries[key] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                                "like_param": like_param}
                tensors[f"optim/{name}/{key}"] = value
            else:
                entries[key] = {"value": _jsonable(value, f"optimizer state {key!r} of {name!r}")}
        layout[name] = entries
    return layout, tensors


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep_last: int,
                    peft_config: dict | None = None) -> Path:
    """Saves the trainable state after ``step`` completed steps into ``root/step_<step>``; all ranks call it.

    Args:
        root: The checkpoint folder (shared by every rank).
        step: Completed steps.
        model: The (sharded) model; its parameters with ``requires_grad`` are saved.
        optimizer: The optimizer over exactly those parameters.
        keep_last: How many step checkpoints to keep; older ones are removed.
        peft_config: The run's PEFT config as JSON, recorded so that a resume with another one is refused.
    """
    rank, world = _rank_world()
    trained = _trained(model)
    names = _optimizer_names(optimizer, trained)
    state_layout, state_tensors = _state_layout(optimizer, names, trained)
    groups = optimizer.state_dict()["param_groups"]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in groups]
    _jsonable(groups, "the optimizer's param_groups")

    mine, my_parts = {}, {}
    for key, t in [*((f"param/{n}", p) for n, p in trained.items()), *state_tensors.items()]:
        local, offset = local_view(t.detach())
        if writes_part(t) and local.numel():
            mine[key] = local.contiguous().cpu()
            my_parts[key] = Part(rank, offset, tuple(local.shape)).to_json()
    every_rank = [my_parts]
    if dist.is_initialized():
        every_rank = [None] * world
        dist.all_gather_object(every_rank, my_parts)
    parts: dict[str, list] = {}
    for rank_parts in every_rank:
        for key, part in rank_parts.items():
            parts.setdefault(key, []).append(part)

    meta = {
        "format": FORMAT, "step": step, "world_size": world, "peft": peft_config,
        "parameters": {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                       for n, p in trained.items()},
        "optimizer": {"param_groups": groups, "state": state_layout},
        "files": [rank_file(r) for r in range(world)], "parts": parts,
    }
    final = root / f"step_{step:08d}"
    with atomic_directory(final, collective=True) as tmp:
        save_file(mine, str(tmp / rank_file(rank)))
        if rank == 0:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if is_main_rank():
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Every ``step_*`` folder under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def read_checkpoint_meta(path: Path) -> dict:
    """The checkpoint's ``checkpoint.json``, checked to be complete: every rank's file is present.

    Raises:
        ValueError: If the folder is not a complete checkpoint of this format; the message names the file.
    """
    meta_path = path / META_FILE
    if not meta_path.is_file():
        legacy = " (it looks like a torch.distributed.checkpoint folder, which holds pickles and is not loaded)" \
            if (path / ".metadata").exists() else ""
        raise ValueError(f"checkpoint {str(path)!r} has no {META_FILE}{legacy}")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: format is {got!r}, expected {FORMAT!r}")
    missing = [f for f in meta.get("files", []) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: {missing[:3]} missing")
    return meta


def latest_complete_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` and, for every newer folder skipped, why it was skipped."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        try:
            read_checkpoint_meta(path)
        except ValueError as e:
            skipped.append(str(e))
            continue
        return path, skipped
    return None, skipped


def config_differences(saved, current, where: str = "peft") -> list[str]:
    """Where two JSON values differ, as ``"path: saved -> current"`` lines (first differences first)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(saved.keys() | current.keys(), key=str)
                for d in config_differences(saved.get(k), current.get(k), f"{where}.{k}")]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        pairs = enumerate(zip(saved, current, strict=True))
        return [d for i, (a, b) in pairs for d in config_differences(a, b, f"{where}[{i}]")]
    return [] if saved == current else [f"{where}: {json.dumps(saved)} in the checkpoint, {json.dumps(current)} now"]


def _check_compatible(path: Path, meta: dict, trained: dict[str, nn.Parameter], peft_config: dict | None) -> None:
    """Refuses, in one line naming the first difference, a checkpoint of other parameters or another PEFT config."""
    recorded = meta.get("peft")
    changed = config_differences(recorded, peft_config) if None not in (recorded, peft_config) else []
    hint = f"; the PEFT config changed: {'; '.join(changed[:3])}" if changed else \
        " (was it written with another PEFT config?)"
    saved = meta["parameters"]
    missing, unexpected = sorted(trained.keys() - saved.keys()), sorted(saved.keys() - trained.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model's trainable parameters: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}{hint}")
    for name, param in trained.items():
        if tuple(saved[name]["shape"]) != tuple(param.shape):
            raise ValueError(f"checkpoint {str(path)!r}: parameter {name!r} has shape {tuple(saved[name]['shape'])} "
                             f"in the checkpoint but {tuple(param.shape)} in the model{hint}")
    if changed:
        raise ValueError(f"checkpoint {str(path)!r} was written with another PEFT config: {'; '.join(changed[:3])}; "
                         "resume with the checkpoint's PEFT config, or start a new run in another work_dir")


def _restore_optimizer(optimizer, meta: dict, names: list[str], trained, reader: PartReader) -> None:
    layout = meta["optimizer"]["state"]
    if sorted(layout) != sorted(names):
        raise ValueError("the checkpoint's optimizer state covers other parameters than the optimizer holds")
    state = {}
    for index, name in enumerate(names):
        param, entries = trained[name], {}
        for key, spec in layout[name].items():
            if "value" in spec:
                entries[key] = spec["value"]
                continue
            dtype = getattr(torch, spec["dtype"])
            value = torch.empty_like(param, dtype=dtype) if spec["like_param"] else torch.empty(spec["shape"],
                                                                                              dtype=dtype)
            reader.fill(f"optim/{name}/{key}", value)
            entries[key] = value
        if entries:
            state[index] = entries
    index_of = {name: i for i, name in enumerate(names)}
    current = optimizer.state_dict()["param_groups"]
    if len(meta["optimizer"]["param_groups"]) != len(current):
        raise ValueError(f"the checkpoint has {len(meta['optimizer']['param_groups'])} optimizer parameter group(s), "
                         f"the optimizer {len(current)}")
    groups = []
    for saved, now in zip(meta["optimizer"]["param_groups"], current, strict=True):
        # JSON turns tuples (Adam's betas) into lists; give each value the type the optimizer uses now.
        restored = {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}
        groups.append({**restored, "params": [index_of[n] for n in saved["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    peft_config: dict | None = None) -> int:
    """Restores the trainable parameters and optimizer state from ``path``; returns the step to continue from.

    Every rank calls it and reads only the parts that overlap its shards. Nothing loaded can execute code.

    Args:
        path: A ``step_<N>`` folder written by :func:`save_checkpoint`.
        model: The model, built and injected like the one that was saved (any world size).
        optimizer: A fresh optimizer over the model's trainable parameters.
        peft_config: The run's PEFT config as JSON; a checkpoint written with another one is refused.

    Raises:
        ValueError: If the checkpoint is incomplete or malformed, holds other parameters or shapes (the message
            names the parameter and both shapes), or was written with another PEFT config (it names the field).
    """
    meta = read_checkpoint_meta(path)
    trained = _trained(model)
    _check_compatible(path, meta, trained, peft_config)
    names = _optimizer_names(optimizer, trained)
    parts = {key: [Part.from_json(p) for p in ps] for key, ps in meta["parts"].items()}
    reader = PartReader({r: path / f for r, f in enumerate(meta["files"])}, parts, _rank_world()[0])
    with torch.no_grad():
        for name, param in trained.items():
            reader.fill(f"param/{name}", param)
    _restore_optimizer(optimizer, meta, names, trained, reader)
    return int(meta["step"])
