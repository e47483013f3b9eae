"""Parameter-efficient fine-tuning: the method interface and the inject / merge entry points."""

from d9d.peft.applicator import inject_peft_and_freeze, merge_peft
from d9d.peft.base import PeftInjectionResult, PeftMethod, PeftPlan, PlannedPeftMethod
from d9d.peft.summary import ParameterCount, count_parameters

__all__ = [
    "ParameterCount",
    "PeftInjectionResult",
    "PeftMethod",
    "PeftPlan",
    "PlannedPeftMethod",
    "count_parameters",
    "inject_peft_and_freeze",
    "merge_peft",
]
