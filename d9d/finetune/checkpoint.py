"""Adapter checkpoints with ``torch.distributed.checkpoint``: trainable parameters, optimizer state and step.

Only what trains is saved (LoRA adapters and fully-tuned modules), each rank writing its own shards, so a
checkpoint of a big model stays small and needs no gather. Each checkpoint is a ``step_<N>`` folder, written under
a temporary name and renamed by rank 0 once every rank finished, so an interrupted save never looks complete.
"""

import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from d9d.model_state.io.atomic import atomic_directory
from d9d.parallel import barrier, is_main_rank

_STEP_DIR = re.compile(r"step_(\d{8})")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _trainable_model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    # Buffers are not trained and come from the model's construction; keep the checkpoint to trained tensors.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep_last: int) -> Path:
    """Saves the trainable state after ``step`` completed steps into ``root/step_<step>``; all ranks call it.

    Older checkpoints beyond ``keep_last`` are removed.
    """
    model_sd, optim_sd = _trainable_model_state(model, optimizer)
    final = root / f"step_{step:08d}"
    with atomic_directory(final, collective=True) as tmp:
        dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)}, checkpoint_id=tmp)
    if is_main_rank():
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restores the trainable parameters and optimizer state from ``path``; returns the step to continue from.

    Raises:
        ValueError: If the checkpoint does not hold every trainable parameter of the model (a different PEFT
            config); the message names the checkpoint and the keys.
    """
    model_sd, optim_sd = _trainable_model_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = {f"model.{k}" for k in model_sd}
    saved = {k for k in stored if k.startswith("model.")}
    if wanted != saved:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model's trainable parameters: missing "
            f"{sorted(wanted - saved)[:5]}, unexpected {sorted(saved - wanted)[:5]} (was it written with another "
            "PEFT config?)"
        )
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    return int(state["step"])
