"""The set-up script stops with a clear error, before pip starts, when the disk cannot hold the venv."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fake_df(bin_dir: Path, free_kb: int) -> None:
    """A `df -Pk` / `df -P` that reports `free_kb` available on the root filesystem."""
    script = bin_dir / "df"
    script.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                      f"echo '/dev/fake 100000000 99000000 {free_kb} 99% /'\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def _fresh_checkout(root: Path) -> None:
    shutil.copytree(REPO / ".ci", root / ".ci")
    for name in ("requirements.lock.txt", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)


def _run_setup(root: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(root / ".ci" / "setup")], check=False, env=env, capture_output=True,
                          text=True, timeout=120)


def test_setup_refuses_a_disk_too_small_for_the_venv(tmp_path):
    _fresh_checkout(tmp_path / "repo")
    (tmp_path / "bin").mkdir()
    _fake_df(tmp_path / "bin", free_kb=3 * 1024 * 1024)
    done = _run_setup(tmp_path / "repo", tmp_path / "bin")
    assert done.returncode == 1
    assert "3 GB free" in done.stderr and "needs ~8 GB" in done.stderr
    assert not (tmp_path / "repo" / ".venv").exists()  # stopped before creating anything
