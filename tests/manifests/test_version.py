"""manifests.version: a dirty tree's code version carries a hash of exactly its uncommitted content."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from manifests.version import code_version, dirty_content_hash


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.invalid")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_clean_tree_has_no_hash_and_ignored_files_do_not_count(repo: Path):
    assert dirty_content_hash(repo) is None
    (repo / "ignored").mkdir()
    (repo / "ignored" / "out.json").write_text("{}")
    assert dirty_content_hash(repo) is None


def test_hash_follows_content_not_just_the_dirty_flag(repo: Path):
    (repo / "a.py").write_text("x = 2\n")
    first = dirty_content_hash(repo)
    assert first is not None
    (repo / "a.py").write_text("x = 3\n")
    second = dirty_content_hash(repo)
    assert second not in (None, first)
    (repo / "a.py").write_text("x = 2\n")
    assert dirty_content_hash(repo) == first  # same edits, same hash


def test_untracked_and_deleted_files_change_the_hash(repo: Path):
    (repo / "a.py").write_text("x = 2\n")
    edited = dirty_content_hash(repo)
    (repo / "new.py").write_text("y = 1\n")
    with_new = dirty_content_hash(repo)
    assert with_new != edited
    (repo / "new.py").unlink()
    (repo / "a.py").unlink()
    assert dirty_content_hash(repo) not in (None, edited, with_new)


def test_code_version_names_the_commit():
    version = code_version()
    assert version.startswith(("git:", "pkg:"))
    if "-dirty" in version:
        assert len(version.split("-dirty.")[1]) == 12
