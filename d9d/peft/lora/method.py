"""The LoRA method: wrap matching ``nn.Linear`` layers in ``LoRALinear`` (``DoRALinear`` with ``use_dora``) and
``nn.Embedding`` layers in ``LoRAEmbedding``."""

from torch import nn
from typing_extensions import Self

from d9d.adapter import AdapterLayer
from d9d.model_state.mapper.leaf import ModelStateMapperRename
from d9d.peft.base import PeftInjectionResult, PeftPlan, PlannedPeftMethod
from d9d.peft.lora.config import LoRAConfig
from d9d.peft.lora.dora import DoRALinear
from d9d.peft.lora.embedding import LoRAEmbedding
from d9d.peft.lora.experts import LoRAExperts, is_fused_experts
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.module_match import match_modules, replace_submodule


class LoRA(PlannedPeftMethod[LoRAConfig]):
    """Wraps every plain ``nn.Linear``, ``nn.Embedding`` and fused Mixture-of-Experts experts module (3-D
    ``gate_up_proj`` / ``down_proj``) whose qualified name fully matches the pattern; remembers them for ``merge``.

    Linears become ``LoRALinear`` (``DoRALinear`` with ``params.use_dora``), embeddings ``LoRAEmbedding``, experts
    ``LoRAExperts``.
    Refused (``ValueError``, nothing changed): a layer inside an existing adapter layer (LoRA does not stack on one
    layer), DoRA on an embedding, an embedding with ``max_norm`` or sparse gradients, a layer registered under
    several names, and a layer whose weight is shared with another module (tied embeddings: merging would change
    the other module too; untie first). Subclasses of ``nn.Linear`` / ``nn.Embedding`` are not wrapped, since their
    owners may read their attributes directly (``nn.MultiheadAttention.out_proj``).
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
        wrappers = [name for name, m in module.named_modules() if isinstance(m, AdapterLayer)]
        inside = [name for name, _ in matched if any(name.startswith(f"{w}.") for w in wrappers)]
        if inside:
            raise ValueError(f"{self.name}: {inside[0]!r} is inside an adapter layer already; LoRA does not stack on "
                             "one layer (narrow module_name_pattern)")
        targets = [(name, m) for name, m in matched if type(m) in (nn.Linear, nn.Embedding) or _is_experts(m)]
        if not targets:
            found = ", ".join(f"{name} ({type(m).__name__})" for name, m in matched[:5])
            raise ValueError(
                f"{self.name}: module_name_pattern matches no nn.Linear, nn.Embedding or fused experts module, "
                f"the layers LoRA can wrap; it matched: {found}{', ...' if len(matched) > 5 else ''}"
            )
        for name, m in targets:
            if isinstance(m, nn.Embedding):
                _check_embedding(name, m, self.config.params.use_dora, self.name)
            elif _is_experts(m):
                if self.config.params.use_dora:
                    raise ValueError(f"{self.name}: {name!r} is a fused experts module; DoRA is supported on nn.Linear "
                                     "only (narrow module_name_pattern, or use a separate plain LoRA config)")
                LoRAExperts.check_base(m, name)
        _refuse_shared(module, targets, self.name)
        names = [name for name, _ in targets]
        return PeftPlan(method_name=self.name, wraps=frozenset(names), targets=tuple(names))

    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult:
        trainable: list[nn.Parameter] = []
        renames: dict[str, str] = {}
        for name in plan.targets:
            base = module.get_submodule(name)
            wrapper = _wrapper_class(base, self.config.params.use_dora)(base, self.config.params)
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
            if not isinstance(wrapper, AdapterLayer):
                raise RuntimeError(f"{self.name}: module {name!r} is no longer a LoRA layer (it is a "
                                   f"{type(wrapper).__name__})")

    def merge(self, module: nn.Module) -> None:
        self.check_merge(module)
        for name in self.wrapped_modules:
            replace_submodule(module, name, module.get_submodule(name).merge_into_base())
        self._merged = True


def _wrapper_class(base: nn.Module, use_dora: bool) -> type[AdapterLayer]:
    if isinstance(base, nn.Embedding):
        return LoRAEmbedding
    if _is_experts(base):
        return LoRAExperts
    return DoRALinear if use_dora else LoRALinear


def _check_embedding(name: str, embedding: nn.Embedding, use_dora: bool, method_name: str) -> None:
    """Raises, naming the module, for an embedding that ``LoRAEmbedding`` cannot wrap."""
    if use_dora:
        raise ValueError(f"{method_name}: {name!r} is an nn.Embedding; DoRA is supported on nn.Linear only "
                         "(narrow module_name_pattern, or use a separate plain LoRA config for embeddings)")
    if embedding.max_norm is not None or embedding.sparse:
        raise ValueError(f"{method_name}: nn.Embedding {name!r} has max_norm or sparse=True, which LoRA cannot wrap")


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
