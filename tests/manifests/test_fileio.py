"""manifests.fileio: atomic writes survive a kill in the middle of the write, and fsync both file and folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from manifests import fileio


def test_kill_in_the_middle_of_a_write_leaves_the_old_file_and_a_removable_temporary(tmp_path: Path):
    target = tmp_path / "out" / "result.json"
    fileio.write_json_atomic(target, {"version": 1})
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal
        from manifests.fileio import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b'{{"version": 2, "half": ')
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # dies mid-write, as an OOM kill would
                fh.write(b'"never"}}')
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=Path(fileio.__file__).parents[1])
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".result.json.")
    assert fileio.remove_stale_temporaries(tmp_path) == leftovers
    assert sorted(target.parent.iterdir()) == [target]


def test_an_exception_inside_the_block_keeps_the_target(tmp_path: Path):
    target = tmp_path / "a.bin"
    fileio.write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"new but incomplete")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_file_and_folder_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    fileio.write_bytes_atomic(tmp_path / "x", b"data")
    assert events == ["fsync-file", "rename", "fsync-dir"]


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path):
    old = os.umask(0o022)
    try:
        path = fileio.write_bytes_atomic(tmp_path / "shared.bin", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert fileio.sha256_file(path) == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


def test_failpoint_kills_half_way_through_the_nth_write_and_the_log_names_completed_writes(tmp_path: Path):
    script = textwrap.dedent(f"""
        from manifests.fileio import write_bytes_atomic
        for i in range(3):
            write_bytes_atomic({str(tmp_path)!r} + f"/f{{i}}.bin", bytes(range(200)))
    """)
    env = {**os.environ, fileio.FAILPOINT_ENV: "2", fileio.WRITE_LOG_ENV: str(tmp_path / "writes.log")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False, cwd=Path(fileio.__file__).parents[1])
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "f0.bin").read_bytes() == bytes(range(200))
    assert not (tmp_path / "f1.bin").exists() and not (tmp_path / "f2.bin").exists()
    (half,) = [p for p in tmp_path.iterdir() if p.name.startswith(".f1.bin.")]
    assert half.stat().st_size == 100  # killed in the middle of the write, not before it
    assert (tmp_path / "writes.log").read_text().splitlines() == [str(tmp_path / "f0.bin")]
