"""Finding and replacing submodules by qualified name."""

import re
from typing import Annotated

from pydantic import AfterValidator
from torch import nn


def _without_flags(pattern: re.Pattern) -> re.Pattern:
    # JSON keeps only the pattern text: flags given to re.compile would be lost, inline ones "(?i)" survive.
    lost = pattern.flags & ~re.compile(pattern.pattern).flags
    if lost:
        raise ValueError(f"pattern {pattern.pattern!r} was compiled with flags {re.RegexFlag(lost)!r}, which JSON "
                         "cannot keep; write them inline instead, e.g. '(?i)...'")
    return pattern


ModuleNamePattern = Annotated[re.Pattern, AfterValidator(_without_flags)]
"""A regex ``fullmatch``-ed against qualified module names; flags must be inline so the config round-trips."""


def match_modules(module: nn.Module, pattern: re.Pattern, method_name: str) -> list[tuple[str, nn.Module]]:
    """Submodules (not the root) whose qualified name ``fullmatch``-es ``pattern``, in definition order.

    Raises:
        ValueError: If nothing matches; the message names the method and pattern.
    """
    matched = [(name, m) for name, m in module.named_modules() if name and pattern.fullmatch(name)]
    if not matched:
        raise ValueError(f"{method_name}: module_name_pattern '{pattern.pattern}' matches no module of the model")
    return matched


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at qualified ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)
