"""Stacks of PEFT methods, the config union and the config-to-method factory."""

from d9d.peft.all.config import AnyPeftConfig, PeftStackConfig
from d9d.peft.all.method import PeftStack, peft_method_from_config

__all__ = ["AnyPeftConfig", "PeftStack", "PeftStackConfig", "peft_method_from_config"]
