"""The public entry points: inject a method and freeze the rest; merge it back."""

from torch import nn
from torch.distributed.fsdp import FSDPModule

from d9d.model_state.mapper import ModelStateMapper
from d9d.model_state.mapper.compose import ModelStateMapperParallel
from d9d.peft.base import PeftMethod


def inject_peft_and_freeze(method: PeftMethod, module: nn.Module) -> ModelStateMapper:
    """Validates ``method`` against ``module``, freezes every parameter, injects, and unfreezes what it trains.

    Nothing is changed when validation fails.

    Returns:
        The injection's load mappers composed in parallel: they rename the original model's checkpoint keys that
        the injection moved (for example ``q_proj.weight -> q_proj.base.weight``). To load a whole checkpoint, see
        ``d9d.model_state.io.checkpoint_mapper_for`` which adds identity for every other key.
    """
    plan = method.plan(module)
    for param in module.parameters():
        param.requires_grad_(False)
    result = method.apply_plan(module, plan)
    for param in result.parameters_to_train:
        param.requires_grad_(True)
    return ModelStateMapperParallel(result.load_state_mappers)


def merge_peft(method: PeftMethod, module: nn.Module) -> None:
    """Folds what ``method`` trained into ``module`` and restores the original architecture.

    Works on FSDP2-sharded weights without gathering them. A second call raises ``RuntimeError``.
    """
    # Parameters FSDP2 still holds gathered (``reshard_after_forward=False``) are temporary copies: a merge into
    # them would be lost on the next reshard, so put every module back on its sharded parameters first.
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()
    method.merge(module)
