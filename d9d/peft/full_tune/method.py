"""The full-tune method: unfreeze the parameters of matching modules."""

from torch import nn
from typing_extensions import Self

from d9d.peft.base import PeftInjectionResult, PeftPlan, PlannedPeftMethod
from d9d.peft.full_tune.config import FullTuneConfig
from d9d.peft.module_match import match_modules


class FullTune(PlannedPeftMethod[FullTuneConfig]):
    """Marks every parameter of the matching modules trainable; the architecture is unchanged.

    Parameters are chosen by identity on the original model, so when another method of the stack wraps a matched
    layer (LoRA, say), the wrapped layer's original weights are still trained, whatever the order in the stack.
    """

    def __init__(self, config: FullTuneConfig):
        """Args:
        config: The pattern of modules to train.
        """
        self.config = config
        self._injected = False
        self._merged = False

    @property
    def name(self) -> str:
        return f"FullTune({self.config.module_name_pattern.pattern})"

    @classmethod
    def from_config(cls, config: FullTuneConfig) -> Self:
        return cls(config)

    def plan(self, module: nn.Module) -> PeftPlan:
        if self._injected:
            raise RuntimeError(f"{self.name} was already injected; build a new method for another model")
        matched = match_modules(module, self.config.module_name_pattern, self.name)
        params = {id(p): p for _, m in matched for p in m.parameters()}
        if not params:
            raise ValueError(f"{self.name}: the matched modules have no parameters: {[n for n, _ in matched][:5]}")
        return PeftPlan(method_name=self.name, trains=tuple(params.values()), targets=tuple(n for n, _ in matched))

    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult:
        self._injected = True
        return PeftInjectionResult(parameters_to_train=list(plan.trains), load_state_mappers=[])

    def check_merge(self, module: nn.Module) -> None:
        if not self._injected:
            raise RuntimeError(f"{self.name} cannot merge: it was never injected")
        if self._merged:
            raise RuntimeError(f"{self.name} was already merged")

    def merge(self, module: nn.Module) -> None:
        self.check_merge(module)
        self._merged = True  # the trained weights already live in the original modules
