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

__all__ = ["atomic_directory", "check_destination", "replace_directory", "temporary_sibling"]


def check_destination(dest: str | os.PathLike) -> None:
    """Refuses a destination that an atomic write would destroy or cannot replace, before anything is written.

    Raises:
        ValueError: If ``dest`` is an existing file (or other non-folder), or resolves to the file system root, the
            working directory or one of its parents (``"."``, ``".."``): replacing it would move the running
            process's own folder away. The message names ``dest``.
    """
    path = Path(dest)
    if path.exists() and not path.is_dir():
        raise ValueError(f"destination {str(path)!r} is an existing file, not a folder; refusing to replace it")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == resolved.parent or cwd == resolved or resolved in cwd.parents:
        raise ValueError(f"destination {str(path)!r} resolves to {resolved}, which holds the working directory "
                         f"{cwd}; write into a new subfolder instead")


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
        dest: The folder to create or replace; it must not be a file or hold the working directory
            (:func:`check_destination`, checked before anything is written).
        collective: Whether every rank of the default process group writes into the folder.
    """
    check_destination(dest)
    dest = Path(os.path.abspath(dest))  # "out" and "out/" name the same folder; a symlink stays a symlink
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
