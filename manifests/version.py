"""Code version recorded in every output: the git commit, plus a content hash of the uncommitted changes when the tree
is dirty (so a result made from uncommitted code can still be traced to the exact code), or the installed package
version outside a git checkout."""
from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def dirty_content_hash(repo_root: Path = REPO_ROOT) -> str | None:
    """sha256 over the paths and contents of every changed, deleted or untracked (not ignored) file, or None when
    the tree is clean. Two trees with the same commit and the same edits get the same hash."""
    status = subprocess.run(["git", "-C", str(repo_root), "status", "--porcelain", "-z", "--untracked-files=all"],
                            capture_output=True, timeout=30, check=True).stdout
    entries = [e for e in status.split(b"\0") if e]
    paths: set[str] = set()
    skip_next = False
    for entry in entries:
        if skip_next:  # the rename source that follows an "R  new\0old" entry
            skip_next = False
            paths.add(entry.decode("utf-8", "surrogateescape"))
            continue
        code, path = entry[:2], entry[3:].decode("utf-8", "surrogateescape")
        paths.add(path)
        skip_next = code[:1] in (b"R", b"C")
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in sorted(paths):
        file = repo_root / path
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        if file.is_file() and not file.is_symlink():
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        elif file.is_symlink():
            digest.update(b"symlink:" + str(file.readlink()).encode())
        else:
            digest.update(b"<deleted>")
    return digest.hexdigest()


@cache
def code_version() -> str:
    """`git:<commit12>` for a clean tree, `git:<commit12>-dirty.<sha256-12 of the changes>` for a dirty one."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        changes = dirty_content_hash()
    except (OSError, subprocess.SubprocessError):
        try:
            return f"pkg:{metadata.version('cc4m')}"
        except metadata.PackageNotFoundError:
            return "unknown"
    return f"git:{commit[:12]}" + (f"-dirty.{changes[:12]}" if changes else "")
