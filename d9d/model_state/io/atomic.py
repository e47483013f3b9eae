"""Atomic folder writes: fill a temporary sibling folder, then put it in place of the destination in one rename.

A reader therefore sees either the previous folder or the complete new one, never a half-written one. A writer
killed midway leaves only the temporary folder ``.<name>.d9d-tmp``, which the next write removes.
"""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from d9d.parallel.process_group import barrier, is_main_rank

__all__ = ["atomic_directory", "replace_directory", "temporary_sibling"]


def temporary_sibling(dest: str | os.PathLike) -> Path:
    """The temporary folder that :func:`atomic_directory` writes ``dest`` into (hidden, next to it)."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.d9d-tmp"


def replace_directory(src: Path, dest: Path) -> None:
    """Renames ``src`` to ``dest``; an existing ``dest`` is moved aside first and removed after.

    ``dest`` is missing only between the two renames, and it is never a mix of old and new files.
    """
    old = dest.parent / f".{dest.name}.d9d-old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    src.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, collective: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder to write ``dest``'s files into; on success it replaces ``dest``.

    Single writer (``collective=False``): the calling process does everything; when the body raises, the temporary
    folder is removed and ``dest`` is left as it was.

    Collective (``collective=True``): every rank of the process group must enter. Rank 0 creates the folder, a
    barrier lets every rank write into it, and after a second barrier (every rank finished) rank 0 renames it; a
    last barrier makes sure nobody continues before ``dest`` exists. ``dest``'s parent must then be one file
    system shared by all ranks. When the body raises, the temporary folder stays (other ranks may still be
    writing into it) and the next write removes it.

    Args:
        dest: The folder to create or replace.
        collective: Whether every rank of the default process group writes into the folder.
    """
    dest = Path(dest)
    tmp = temporary_sibling(dest)
    main = is_main_rank() or not collective
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if collective:
        barrier()
    try:
        yield tmp
    except BaseException:
        if not collective:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if collective:
        barrier()  # every rank's files are in place
    if main:
        replace_directory(tmp, dest)
    if collective:
        barrier()  # nobody returns before dest exists
