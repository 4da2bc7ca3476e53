"""curation.lock: one build per folder; a second fails at once naming the holder; a dead holder's lock is taken over
and its temporaries removed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from curation.lock import LOCK_NAME, BuildLock, BuildLocked

REPO = Path(__file__).resolve().parents[2]


def _hold_lock_in_child(build_dir: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys, time
        from curation.lock import BuildLock
        lock = BuildLock({str(build_dir)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_build_fails_at_once_naming_the_holder(tmp_path: Path):
    holder = _hold_lock_in_child(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(BuildLocked) as err:
            BuildLock(tmp_path).acquire()
        assert time.monotonic() - started < 5  # fails at once, never waits
        message = str(err.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "started 20" in message
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_build_is_taken_over_and_its_temporaries_removed(tmp_path: Path):
    holder = _hold_lock_in_child(tmp_path)
    leftover = tmp_path / "shards" / ".cc4m-000003.tar.abc123.tmp"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a tar")
    scratch = tmp_path / "staging" / "_tmp"
    scratch.mkdir(parents=True)
    (scratch / "00001.feather").write_bytes(b"x")
    kept = tmp_path / "shards" / "cc4m-000000.tar"
    kept.write_bytes(b"finished")
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    with BuildLock(tmp_path) as lock:
        assert lock.previous_holder["pid"] == holder.pid
        assert not leftover.exists() and not scratch.exists() and kept.exists()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly
    with BuildLock(tmp_path) as again:  # a clean release is not a stale lock
        assert again.previous_holder is None


def test_same_process_cannot_hold_two_builds_of_one_folder(tmp_path: Path):
    with BuildLock(tmp_path), pytest.raises(BuildLocked):
        BuildLock(tmp_path).acquire()


def test_run_build_refuses_a_folder_another_build_holds(tmp_path: Path):
    from curation.build import run_build
    from curation.config import BuildConfig

    source = tmp_path / "src.tsv"
    source.write_text("http://example.invalid/a.jpg\ta dog\n")
    build = tmp_path / "build"
    holder = _hold_lock_in_child(build)
    try:
        with pytest.raises(BuildLocked, match=f"pid {holder.pid}"):
            run_build(BuildConfig(source=str(source), build_dir=str(build)))
        assert not (build / "config.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
