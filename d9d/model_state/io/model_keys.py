"""The model side of checkpoint I/O: which state keys a model has, which alias each other, which are adapters."""

import torch
from torch import nn

from d9d.adapter import adapter_state_keys
from d9d.model_state.mapper import ModelStateMapper
from d9d.model_state.mapper.compose import ModelStateMapperParallel
from d9d.model_state.mapper.leaf import ModelStateMapperIdentity


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)``: the live parameters (DTensors when sharded) and persistent buffers."""
    return model.state_dict(keep_vars=True)


def alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Keys grouped by the tensor object they name (tied weights share one), each group in state-dict order."""
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault(id(tensor), []).append(key)
    return list(groups.values())


def checkpoint_mapper_for(model: nn.Module, injection_mapper: ModelStateMapper) -> ModelStateMapper:
    """The mapper that loads a checkpoint of the original model into the injected ``model``.

    It is ``injection_mapper`` (what ``inject_peft_and_freeze`` returned: the renames the injection caused) in
    parallel with identity for every other key of ``model``'s state, except adapter parameters (no pretrained
    checkpoint has them; ``materialize_model`` or the layer's constructor initializes them) and all but the first
    name of tied weights (Hugging Face checkpoints store a tied tensor once).

    Args:
        model: The injected model (sharded or not).
        injection_mapper: The mapper ``inject_peft_and_freeze`` returned for ``model``.
    """
    produced = injection_mapper.output_keys()
    skip = adapter_state_keys(model) | produced
    identity = [group[0] for group in alias_groups(model_state(model)) if not skip.intersection(group)]
    return ModelStateMapperParallel([injection_mapper, *(ModelStateMapperIdentity(k) for k in identity)])
