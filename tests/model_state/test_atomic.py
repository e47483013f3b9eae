"""Atomic folder writes (single writer; the collective form runs under torchrun in tests/distributed)."""

import pytest

from d9d.model_state.io.atomic import atomic_directory, temporary_sibling

pytestmark = pytest.mark.local


def test_replaces_an_existing_folder_only_when_complete(tmp_path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_directory(dest) as tmp:
        assert tmp == temporary_sibling(dest)
        (tmp / "new.txt").write_text("new")
        assert (dest / "old.txt").is_file()  # untouched while writing
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_old_folder_and_no_temporary_one(tmp_path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    stale = temporary_sibling(dest)
    stale.mkdir()
    (stale / "half.txt").write_text("from a killed run")
    seen = []

    def failing_write() -> None:
        with atomic_directory(dest) as tmp:
            seen.extend(p.name for p in tmp.iterdir())
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_write()
    assert seen == []  # the stale folder was cleared first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dest / "old.txt").read_text() == "old"
