"""The abstract PEFT method and what an injection returns."""

import abc
import dataclasses
from typing import Generic, TypeVar

from pydantic import BaseModel
from torch import nn
from typing_extensions import Self

from d9d.model_state.mapper import ModelStateMapper

TConfig = TypeVar("TConfig", bound=BaseModel)


@dataclasses.dataclass
class PeftInjectionResult:
    """What an injection did.

    Attributes:
        parameters_to_train: The parameters the method wants trained (everything else stays frozen).
        load_state_mappers: Mappers that turn a checkpoint of the original model into the injected model's keys.
    """

    parameters_to_train: list[nn.Parameter]
    load_state_mappers: list[ModelStateMapper]


@dataclasses.dataclass(frozen=True)
class PeftPlan:
    """What a method would do to a module, resolved against the module's *original* structure, before any change.

    Every method of a stack is planned on the untouched model, so a stack's result never depends on whether an
    earlier method already restructured the model, and conflicts are found before anything is mutated.

    Attributes:
        method_name: A label for error messages, e.g. ``"LoRA(.*q_proj)"``.
        wraps: Qualified names of modules the method will replace by a wrapper.
        trains: Parameters (by identity) the method will mark trainable directly.
        targets: Every qualified module name the method matched.
        parts: For a stack, the plan of each of its methods, in order.
    """

    method_name: str
    wraps: frozenset[str] = frozenset()
    trains: tuple[nn.Parameter, ...] = ()
    targets: tuple[str, ...] = ()
    parts: tuple["PeftPlan", ...] = ()


class PeftMethod(abc.ABC, Generic[TConfig]):
    """A parameter-efficient fine-tuning method: injects into and merges out of a module.

    A method instance is bound to the one module it injected into: it records what it changed, and ``merge``
    undoes exactly that.

    Two optional hooks let a stack validate all of its methods before any of them changes the model:
    :meth:`plan` (resolve and validate on the untouched module) with :meth:`apply_plan` (carry it out), and
    :meth:`check_merge`. A method that implements only ``inject`` / ``merge`` / ``from_config`` still works in a
    stack; it is then validated only when its turn comes.
    """

    @abc.abstractmethod
    def inject(self, module: nn.Module) -> PeftInjectionResult:
        """Modifies ``module`` in place (for example wraps layers) and says what to train and how to load.

        Raises:
            ValueError: If the request cannot be carried out on ``module``; nothing is changed then.
        """

    @abc.abstractmethod
    def merge(self, module: nn.Module) -> None:
        """Folds the method's trained state into the original architecture, undoing the injection's wrappers.

        Raises:
            RuntimeError: If the method was never injected or was already merged.
        """

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: TConfig) -> Self:
        """Builds the method from its pydantic config."""

    def plan(self, module: nn.Module) -> PeftPlan:
        """Resolves and validates what ``inject`` would do, without changing ``module`` (default: nothing known)."""
        return PeftPlan(method_name=type(self).__name__)

    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult:
        """Carries out a plan made by :meth:`plan` on the same module (default: :meth:`inject`)."""
        return self.inject(module)

    def check_merge(self, module: nn.Module) -> None:
        """Raises what :meth:`merge` would raise, without changing ``module`` (default: no check)."""


class PlannedPeftMethod(PeftMethod[TConfig]):
    """A method whose injection is a :meth:`plan` followed by :meth:`apply_plan`; both must be implemented."""

    @abc.abstractmethod
    def plan(self, module: nn.Module) -> PeftPlan: ...

    @abc.abstractmethod
    def apply_plan(self, module: nn.Module, plan: PeftPlan) -> PeftInjectionResult: ...

    def inject(self, module: nn.Module) -> PeftInjectionResult:
        return self.apply_plan(module, self.plan(module))
