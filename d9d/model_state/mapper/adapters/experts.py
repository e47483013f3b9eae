"""Mappers between the per-expert checkpoint layout of Mixture-of-Experts layers and transformers v5's fused one.

Hub checkpoints (and transformers v5's ``save_pretrained``) store each expert's projections on their own:
``<experts>.{e}.gate_proj.weight`` [I, H], ``.up_proj.weight`` [I, H], ``.down_proj.weight`` [H, I] (Mixtral names
them ``w1``, ``w3``, ``w2``). The v5 modules hold them fused: ``<experts>.gate_up_proj`` [E, 2I, H] (gate rows, then
up rows) and ``<experts>.down_proj`` [E, H, I]. Stack over the experts, then concatenate gate and up.
"""

import re
from collections.abc import Collection

from d9d.model_state.mapper.abc import ModelStateMapper
from d9d.model_state.mapper.adapters.module import identity_mapper_from_keys
from d9d.model_state.mapper.compose import ModelStateMapperParallel, ModelStateMapperSequential
from d9d.model_state.mapper.leaf import (
    ModelStateMapperConcatenateTensors,
    ModelStateMapperIdentity,
    ModelStateMapperStackTensors,
)

# (gate, up, down) projection names of the per-expert layout, as the model families spell them.
PER_EXPERT_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def per_expert_to_fused_mapper(prefix: str, num_experts: int,
                               names: tuple[str, str, str] = PER_EXPERT_NAMES[0]) -> ModelStateMapper:
    """Reads ``<prefix>.{e}.<gate|up|down>.weight`` for every expert, produces ``<prefix>.gate_up_proj`` and
    ``<prefix>.down_proj``, in one group each.

    Args:
        prefix: The experts module's qualified name (``model.layers.0.mlp.experts``).
        num_experts: How many experts the checkpoint holds.
        names: The per-expert names of the gate, up and down projections.
    """
    if num_experts <= 0:
        raise ValueError(f"per_expert_to_fused_mapper: {prefix!r} needs at least one expert, got {num_experts}")
    gate, up, down = ([f"{prefix}.{e}.{name}.weight" for e in range(num_experts)] for name in names)
    return ModelStateMapperSequential([
        ModelStateMapperParallel([
            ModelStateMapperStackTensors(gate, f"{prefix}.{names[0]}", dim=0),
            ModelStateMapperStackTensors(up, f"{prefix}.{names[1]}", dim=0),
            ModelStateMapperStackTensors(down, f"{prefix}.down_proj", dim=0),
        ]),
        ModelStateMapperParallel([
            ModelStateMapperConcatenateTensors([f"{prefix}.{names[0]}", f"{prefix}.{names[1]}"],
                                               f"{prefix}.gate_up_proj", dim=1),
            ModelStateMapperIdentity(f"{prefix}.down_proj"),
        ]),
    ])


def fused_experts_loading_mapper(mapper: ModelStateMapper, checkpoint_keys: Collection[str]) -> ModelStateMapper:
    """``mapper`` preceded by a stage that builds the fused expert weights it reads from a per-expert checkpoint.

    For each ``<prefix>.gate_up_proj`` that ``mapper`` reads and the checkpoint lacks while holding
    ``<prefix>.0.<gate>.weight`` (either spelling of :data:`PER_EXPERT_NAMES`), the stage stacks and concatenates
    that module's experts; every other key passes through. Returns ``mapper`` itself when nothing is per-expert.
    """
    checkpoint_keys = set(checkpoint_keys)
    needed = mapper.input_keys()
    parts, produced = [], set()
    for key in sorted(needed - checkpoint_keys):
        if not key.endswith(".gate_up_proj"):
            continue
        prefix = key.removesuffix(".gate_up_proj")
        for names in PER_EXPERT_NAMES:
            pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.{re.escape(names[0])}\.weight")
            experts = [int(m.group(1)) for k in checkpoint_keys if (m := pattern.fullmatch(k))]
            if experts:
                parts.append(per_expert_to_fused_mapper(prefix, max(experts) + 1, names))
                produced |= {key, f"{prefix}.down_proj"}
                break
    if not parts:
        return mapper
    return ModelStateMapperSequential([
        ModelStateMapperParallel([*parts, identity_mapper_from_keys(sorted(needed - produced))]),
        mapper,
    ])
