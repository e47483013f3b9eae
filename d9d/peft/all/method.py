"""The stack method and the one factory from configs to methods."""

from collections.abc import Sequence

from torch import nn
from typing_extensions import Self

from d9d.peft.all.config import AnyPeftConfig, PeftStackConfig
from d9d.peft.base import PeftInjectionResult, PeftMethod, PeftPlan, PlannedPeftMethod
from d9d.peft.full_tune import FullTune, FullTuneConfig
from d9d.peft.lora import LoRA, LoRAConfig


class PeftStack(PlannedPeftMethod[PeftStackConfig]):
    """Applies several methods: plans them all on the untouched model, injects in order, merges in reverse order.

    Two methods of one stack may not wrap the same module. A FullTune that matches a layer another method wraps
    trains that layer's original parameters, whichever comes first in the stack.
    """

    def __init__(self, methods: Sequence[PeftMethod]):
        """Args:
        methods: The methods, in injection order.
        """
        if not methods:
            raise ValueError("PeftStack needs at least one method")
        self.methods = list(methods)

    @classmethod
    def from_config(cls, config: PeftStackConfig) -> Self:
        return cls([peft_method_from_config(c) for c in config.methods])

    @property
    def name(self) -> str:
        return "PeftStack"

    def plan(self, module: nn.Module) -> PeftPlan:
        plans = [m.plan(module) for m in self.methods]
        owner: dict[str, str] = {}
        for p in plans:
            for name in sorted(p.wraps):
                if name in owner:
                    raise ValueError(f"module {name!r} would be wrapped by both {owner[name]} and {p.method_name}")
                owner[name] = p.method_name
        return PeftPlan(
            method_name=self.name,
            wraps=frozenset(owner),
            trains=tuple(t for p in plans for t in p.trains),
            targets=tuple(t for p in plans for t in p.targets),
            parts=tuple(plans),
        )

    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult:
        if len(plan.parts) != len(self.methods):
            raise TypeError("PeftStack.apply_plan needs the plan made by this stack's plan()")
        trainable: dict[int, nn.Parameter] = {}
        mappers = []
        for method, part in zip(self.methods, plan.parts, strict=True):
            result = method.apply_plan(module, part)
            trainable.update((id(p), p) for p in result.parameters_to_train)
            mappers += result.load_state_mappers
        return PeftInjectionResult(parameters_to_train=list(trainable.values()), load_state_mappers=mappers)

    def check_merge(self, module: nn.Module) -> None:
        for method in self.methods:
            method.check_merge(module)

    def merge(self, module: nn.Module) -> None:
        self.check_merge(module)  # all parts first, so a refused merge leaves every part as it was
        for method in reversed(self.methods):
            method.merge(module)


def peft_method_from_config(config: AnyPeftConfig) -> PeftMethod:
    """Builds the method a config describes (recursively for stacks).

    Raises:
        TypeError: If ``config`` is not one of the known PEFT configs; the message names its type.
    """
    if isinstance(config, LoRAConfig):
        return LoRA.from_config(config)
    if isinstance(config, FullTuneConfig):
        return FullTune.from_config(config)
    if isinstance(config, PeftStackConfig):
        return PeftStack.from_config(config)
    raise TypeError(f"unknown PEFT config type {type(config).__name__}; expected one of LoRAConfig, FullTuneConfig, "
                    "PeftStackConfig")
