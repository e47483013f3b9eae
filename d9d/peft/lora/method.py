"""The LoRA method: wrap matching ``nn.Linear`` layers in ``LoRALinear``."""

from torch import nn
from typing_extensions import Self

from d9d.model_state.mapper.leaf import ModelStateMapperRename
from d9d.peft.base import PeftInjectionResult, PeftPlan, PlannedPeftMethod
from d9d.peft.lora.config import LoRAConfig
from d9d.peft.lora.experts import LoRAExperts, is_fused_experts
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.module_match import match_modules, replace_submodule


class LoRA(PlannedPeftMethod[LoRAConfig]):
    """Wraps every plain ``nn.Linear`` (in ``LoRALinear``) and every fused Mixture-of-Experts experts module (3-D
    ``gate_up_proj`` / ``down_proj``, in ``LoRAExperts``) whose qualified name fully matches the pattern; remembers
    them for ``merge``.

    Refused (``ValueError``, nothing changed): a layer inside an existing ``LoRALinear`` (LoRA does not stack on one
    layer), a layer registered under several names, and a layer whose weight is shared with another module (tied
    embeddings: merging would change the other module too; untie first). ``nn.Linear`` subclasses are not wrapped,
    since their owners may read their attributes directly (``nn.MultiheadAttention.out_proj``).
    """

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

    @property
    def wrapped_modules(self) -> list[str]:
        """Qualified names of the layers this method wrapped (empty before injection)."""
        return list(self._wrapped or [])

    @classmethod
    def from_config(cls, config: LoRAConfig) -> Self:
        return cls(config)

    def plan(self, module: nn.Module) -> PeftPlan:
        if self._wrapped is not None:
            raise RuntimeError(f"{self.name} was already injected; build a new method for another model")
        matched = match_modules(module, self.config.module_name_pattern, self.name)
        wrappers = {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear | LoRAExperts)}
        inside = [(name, w) for name, _ in matched for w in wrappers if name.startswith(f"{w}.")]
        if inside:
            name, w = inside[0]
            raise ValueError(f"{self.name}: {name!r} is inside a {type(wrappers[w]).__name__} already; LoRA does not "
                             "stack on one layer (narrow module_name_pattern)")
        linears = [(name, m) for name, m in matched if type(m) is nn.Linear or _is_experts(m)]
        if not linears:
            found = ", ".join(f"{name} ({type(m).__name__})" for name, m in matched[:5])
            raise ValueError(
                f"{self.name}: module_name_pattern matches no nn.Linear and no fused experts module, the only "
                f"modules LoRA wraps; it matched: {found}{', ...' if len(matched) > 5 else ''}"
            )
        for name, m in linears:
            if _is_experts(m):
                LoRAExperts.check_base(m, name)
        _refuse_shared(module, linears, self.name)
        names = [name for name, _ in linears]
        return PeftPlan(method_name=self.name, wraps=frozenset(names), targets=tuple(names))

    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult:
        trainable: list[nn.Parameter] = []
        renames: dict[str, str] = {}
        for name in plan.targets:
            base = module.get_submodule(name)
            wrapper = (LoRAExperts if _is_experts(base) else LoRALinear)(base, self.config.params)
            replace_submodule(module, name, wrapper)
            trainable += list(wrapper.adapter_parameters())
            for param_name, _ in base.named_parameters(recurse=False):
                renames[f"{name}.{param_name}"] = f"{name}.base.{param_name}"
        self._wrapped = list(plan.targets)
        return PeftInjectionResult(parameters_to_train=trainable, load_state_mappers=[ModelStateMapperRename(renames)])

    def check_merge(self, module: nn.Module) -> None:
        if self._wrapped is None:
            raise RuntimeError(f"{self.name} cannot merge: it was never injected")
        if self._merged:
            raise RuntimeError(f"{self.name} was already merged; merging twice would apply the update twice")
        for name in self._wrapped:
            wrapper = module.get_submodule(name)
            if not isinstance(wrapper, LoRALinear | LoRAExperts):
                raise RuntimeError(f"{self.name}: module {name!r} is no longer a LoRALinear or LoRAExperts "
                                   f"({type(wrapper).__name__})")

    def merge(self, module: nn.Module) -> None:
        self.check_merge(module)
        for name in self.wrapped_modules:
            replace_submodule(module, name, module.get_submodule(name).merge_into_base())
        self._merged = True


def _is_experts(m: nn.Module) -> bool:
    return not isinstance(m, LoRAExperts) and is_fused_experts(m)


def _refuse_shared(root: nn.Module, targets: list[tuple[str, nn.Module]], method_name: str) -> None:
    """Raises if a target module, or one of its parameters, is reachable under another name."""
    names_of: dict[int, list[str]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(name)
    for name, p in root.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for name, m in targets:
        if len(names_of[id(m)]) > 1:
            raise ValueError(f"{method_name}: module {name!r} is registered under several names "
                             f"{names_of[id(m)]}; LoRA cannot wrap a shared module")
        for p in m.parameters(recurse=False):
            if len(names_of[id(p)]) > 1:
                raise ValueError(f"{method_name}: a parameter of {name!r} is shared as {names_of[id(p)]} (tied "
                                 "weights); merging would change the other module too, so untie it first")
