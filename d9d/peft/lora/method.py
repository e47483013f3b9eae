"""The LoRA method: wrap matching ``nn.Linear`` layers in ``LoRALinear``."""

from torch import nn
from typing_extensions import Self

from d9d.model_state.mapper.leaf import ModelStateMapperRename
from d9d.peft.base import PeftInjectionResult, PeftMethod, PeftPlan
from d9d.peft.lora.config import LoRAConfig
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.module_match import match_modules, replace_submodule


class LoRA(PeftMethod[LoRAConfig]):
    """Wraps every ``nn.Linear`` whose qualified name fully matches the pattern; remembers them for ``merge``."""

    def __init__(self, config: LoRAConfig):
        """Args:
        config: Pattern and adapter hyper-parameters.
        """
        self.config = config
        self._wrapped: list[str] | None = None  # qualified names wrapped by inject; None until then
        self._merged = False

    @property
    def name(self) -> str:
        return f"LoRA({self.config.module_name_pattern.pattern})"

    @classmethod
    def from_config(cls, config: LoRAConfig) -> Self:
        return cls(config)

    def plan(self, module: nn.Module) -> PeftPlan:
        if self._wrapped is not None:
            raise RuntimeError(f"{self.name} was already injected; build a new method for another model")
        matched = match_modules(module, self.config.module_name_pattern, self.name)
        linears = [name for name, m in matched if isinstance(m, nn.Linear)]
        if not linears:
            found = ", ".join(f"{name} ({type(m).__name__})" for name, m in matched[:5])
            raise ValueError(
                f"{self.name}: module_name_pattern matches no nn.Linear, LoRA can only wrap nn.Linear; "
                f"it matched: {found}{', ...' if len(matched) > 5 else ''}"
            )
        return PeftPlan(method_name=self.name, wraps=frozenset(linears), targets=tuple(linears))

    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult:
        trainable: list[nn.Parameter] = []
        renames: dict[str, str] = {}
        for name in plan.targets:
            base = module.get_submodule(name)
            wrapper = LoRALinear(base, self.config.params)
            replace_submodule(module, name, wrapper)
            trainable += [wrapper.lora_A, wrapper.lora_B]
            for param_name, _ in base.named_parameters(recurse=False):
                renames[f"{name}.{param_name}"] = f"{name}.base.{param_name}"
        self._wrapped = list(plan.targets)
        return PeftInjectionResult(parameters_to_train=trainable, load_state_mappers=[ModelStateMapperRename(renames)])

    def merge(self, module: nn.Module) -> None:
        if self._wrapped is None:
            raise RuntimeError(f"{self.name} cannot merge: it was never injected")
        if self._merged:
            raise RuntimeError(f"{self.name} was already merged; merging twice would apply the update twice")
        for name in self._wrapped:
            wrapper = module.get_submodule(name)
            if not isinstance(wrapper, LoRALinear):
                raise RuntimeError(f"{self.name}: module {name!r} is no longer a LoRALinear ({type(wrapper).__name__})")
        for name in self._wrapped:
            replace_submodule(module, name, module.get_submodule(name).merge_with_base_())
        self._merged = True
