"""Tied weights (an LM head sharing the input embedding): untied before sharding, filled from one checkpoint key.

FSDP2 shards each parameter in exactly one group, and a Hugging Face checkpoint stores a tied weight once. So the
model is untied on ``meta`` (the tied copy becomes its own parameter) and the loading mapper produces both keys
from the one stored tensor. The export then writes both, with ``tie_word_embeddings`` off, so a trained LM head is
never silently replaced by the embedding.
"""

import dataclasses
from pathlib import Path

import torch
from torch import nn

from d9d.model_state.io import read_layout
from d9d.model_state.mapper import ModelStateMapper
from d9d.model_state.mapper.compose import ModelStateMapperParallel, ModelStateMapperSequential
from d9d.model_state.mapper.leaf import ModelStateMapperDuplicate, ModelStateMapperIdentity


@dataclasses.dataclass(frozen=True)
class TiedWeights:
    """The ties that :func:`untie_weights` broke, as ``copy key -> source key`` (original model names)."""

    ties: dict[str, str]

    def loading_mapper(self, mapper: ModelStateMapper, checkpoint_dir: Path) -> ModelStateMapper:
        """``mapper`` preceded by a stage that fills the tied keys the checkpoint does not store from their source."""
        stored = read_layout(checkpoint_dir).keys()
        needed = mapper.input_keys()
        fill: dict[str, list[str]] = {}
        for copy, source in self.ties.items():
            if copy in needed and copy not in stored and source in stored:
                fill.setdefault(source, []).append(copy)
        if not fill:
            return mapper
        produced = set(fill) | {c for copies in fill.values() for c in copies}
        first = ModelStateMapperParallel(
            [ModelStateMapperIdentity(k) for k in sorted(needed - produced)]
            + [ModelStateMapperDuplicate(src, copies) for src, copies in sorted(fill.items())]
        )
        return ModelStateMapperSequential([first, mapper])


def untie_weights(model: nn.Module) -> TiedWeights:
    """Gives every parameter registered under a second name its own (uninitialized) parameter, in place.

    Call on a ``meta`` model, before injection. Returns the broken ties.
    """
    first_name: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in first_name:
            first_name[id(param)] = name
            continue
        ties[name] = first_name[id(param)]
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[attr] = nn.Parameter(torch.empty_like(param, device=param.device),
                                               requires_grad=param.requires_grad)
    return TiedWeights(ties)
