"""Argument checks shared by the leaf mappers: a key is one ``str``, a list of keys is never a bare ``str``."""

from collections.abc import Iterable


def require_name(mapper: str, field: str, name: object) -> str:
    """``name`` itself if it is a non-empty ``str``.

    Raises:
        TypeError: If it is not a ``str``; the message names the mapper and the argument.
        ValueError: If it is empty.
    """
    if not isinstance(name, str):
        raise TypeError(f"{mapper}: {field} must be one key (str), got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError(f"{mapper}: {field} is an empty key")
    return name


def require_names(mapper: str, field: str, names: Iterable[str], at_least: int = 1) -> list[str]:
    """``names`` as a list of distinct non-empty keys, at least ``at_least`` of them.

    Raises:
        TypeError: If ``names`` is a bare ``str`` (it would be iterated per character) or holds a non-``str``.
        ValueError: If it has fewer than ``at_least`` keys or repeats one.
    """
    if isinstance(names, str):
        raise TypeError(f"{mapper}: {field} must be a collection of keys, got the single str {names!r}")
    listed = [require_name(mapper, field, n) for n in names]
    if len(listed) < at_least:
        raise ValueError(f"{mapper}: {field} needs at least {at_least} key(s), got {listed}")
    repeated = sorted({n for n in listed if listed.count(n) > 1})
    if repeated:
        raise ValueError(f"{mapper}: {field} repeats key(s) {repeated}")
    return listed
