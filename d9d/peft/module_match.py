"""Finding and replacing submodules by qualified name."""

import re
import time
from typing import Annotated

import regex
from pydantic import AfterValidator
from torch import nn

MATCH_BUDGET_S = 2.0
"""How long one pattern may take to match all module names of a model before it is refused as runaway."""

_SHOWN_NAMES = 6


class PatternTimeoutError(ValueError):
    """A module-name pattern took longer than :data:`MATCH_BUDGET_S` to match (catastrophic backtracking)."""


def _check_pattern(pattern: re.Pattern) -> re.Pattern:
    # JSON keeps only the pattern text: flags given to re.compile would be lost, inline ones "(?i)" survive.
    lost = pattern.flags & ~re.compile(pattern.pattern).flags
    if lost:
        raise ValueError(f"pattern {pattern.pattern!r} was compiled with flags {re.RegexFlag(lost)!r}, which JSON "
                         "cannot keep; write them inline instead, e.g. '(?i)...'")
    try:
        _bounded(pattern)
    except regex.error as e:
        raise ValueError(f"pattern {pattern.pattern!r} cannot be matched with a time limit: {e}") from e
    return pattern


ModuleNamePattern = Annotated[re.Pattern, AfterValidator(_check_pattern)]
"""A regex ``fullmatch``-ed against qualified module names; flags must be inline so the config round-trips."""


def _bounded(pattern: re.Pattern) -> regex.Pattern:
    # The `regex` package accepts `re`'s syntax and, unlike `re`, can stop a match after a timeout.
    return regex.compile(pattern.pattern, flags=regex.VERSION0)


def fullmatch_names(names: list[str], pattern: re.Pattern, method_name: str) -> list[bool]:
    """Whether each name ``fullmatch``-es ``pattern``, within :data:`MATCH_BUDGET_S` seconds for all of them.

    Raises:
        PatternTimeoutError: If matching runs past the budget (a pattern with nested quantifiers such as
            ``(a+)+$`` can take exponential time); the message names the method, the pattern and the module name.
    """
    compiled = _bounded(pattern)
    deadline = time.monotonic() + MATCH_BUDGET_S
    found = []
    for name in names:
        try:
            found.append(compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None)
        except TimeoutError as e:
            raise PatternTimeoutError(
                f"{method_name}: module_name_pattern '{pattern.pattern}' took more than {MATCH_BUDGET_S:g} s to match "
                f"the module names (stopped at {name!r}); it probably nests quantifiers, like '(a+)+' or "
                r"'(\w+_?)+': simplify it, e.g. '.*\.q_proj'"
            ) from e
    return found


def _no_match_message(names: list[str], pattern: re.Pattern, method_name: str) -> str:
    text = (f"{method_name}: module_name_pattern '{pattern.pattern}' matches no module of the model (patterns are "
            "fullmatched against qualified module names)")
    try:
        widened = re.compile(r".*\." + pattern.pattern)
    except re.error:  # e.g. a global inline flag, which must stay at the start
        widened = None
    hits = []
    if widened is not None:
        hits = [n for n, hit in zip(names, fullmatch_names(names, widened, method_name), strict=True) if hit]
    if hits:
        text += f"; '{widened.pattern}' would match {len(hits)} module(s), e.g. {hits[0]!r}"
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    return f"{text}; the model's modules include {shown}{', ...' if len(names) > _SHOWN_NAMES else ''}"


def match_modules(module: nn.Module, pattern: re.Pattern, method_name: str) -> list[tuple[str, nn.Module]]:
    """Submodules (not the root) whose qualified name ``fullmatch``-es ``pattern``, in definition order.

    Raises:
        ValueError: If nothing matches; the message names the method and pattern, suggests ``'.*\\.' + pattern``
            when that would match, and lists a few of the model's module names.
        PatternTimeoutError: If the pattern takes too long to match (see :func:`fullmatch_names`).
    """
    named = [(name, m) for name, m in module.named_modules() if name]
    names = [name for name, _ in named]
    matched = [pair for pair, hit in zip(named, fullmatch_names(names, pattern, method_name), strict=True) if hit]
    if not matched:
        raise ValueError(_no_match_message(names, pattern, method_name))
    return matched


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at qualified ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)
