"""curation.lifetime and the download stage's process handling: helpers die with the build, a stalled download is
stopped with a clear message, and no worker outlives either."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation.download_driver as download_module
from curation.download import DownloadConfig, download_selected
from curation.download_driver import DownloadStalled
from manifests.layout import BuildLayout, part_name

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_dead(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


HELPER = """
import subprocess, sys, time
from curation.lifetime import exit_with_parent
exit_with_parent()
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(worker.pid, flush=True)
time.sleep(120)
"""
BUILD = """
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, sys.argv[1]], start_new_session=True, stdout=subprocess.PIPE, text=True)
worker = helper.stdout.readline().strip()
print(helper.pid, worker, flush=True)
time.sleep(120)
"""


def test_a_helper_and_its_workers_die_when_the_build_is_killed(tmp_path: Path):
    """build (killed with SIGKILL) -> helper in its own session running exit_with_parent -> a worker it spawned."""
    (tmp_path / "helper.py").write_text(HELPER)
    build = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / "helper.py")], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    helper, worker = (int(x) for x in build.stdout.readline().split())
    assert _alive(helper) and _alive(worker)
    build.send_signal(signal.SIGKILL)  # the OOM killer's way: only the main process
    build.wait()
    assert _wait_dead([helper, worker], within_s=10) == []


LATE_HELPER = """
import sys, time
time.sleep(float(sys.argv[2]))  # slow imports: the build is killed before the watchdog starts
from curation.lifetime import exit_with_parent
exit_with_parent(int(sys.argv[1]))
time.sleep(120)
"""
LATE_BUILD = """
import os, subprocess, sys, time
helper = subprocess.Popen([sys.executable, sys.argv[1], str(os.getpid()), "1.5"], start_new_session=True)
print(helper.pid, flush=True)
time.sleep(120)
"""


def test_a_helper_whose_build_died_before_its_watchdog_started_still_dies(tmp_path: Path):
    """The starter's pid comes down with the helper: a helper reparented before it got to exit_with_parent (its
    imports take seconds under load) still sees that its build is gone, instead of watching its new parent."""
    (tmp_path / "helper.py").write_text(LATE_HELPER)
    build = subprocess.Popen([sys.executable, "-c", LATE_BUILD, str(tmp_path / "helper.py")], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    helper = int(build.stdout.readline())
    build.send_signal(signal.SIGKILL)  # before the helper's watchdog exists
    build.wait()
    assert _alive(helper)
    assert _wait_dead([helper], within_s=10) == []


def _selected_part(build: Path, urls: list[str]) -> None:
    layout = BuildLayout(build)
    layout.selected_dir.mkdir(parents=True)
    table = pa.table({"sample_id": pa.array(range(len(urls)), pa.int64()), "url": urls,
                      "caption": ["a dog"] * len(urls)})
    pq.write_table(table, layout.selected_dir / part_name(0))


@pytest.fixture()
def silent_server():
    """Accepts connections on 127.0.0.1 and never answers (a hung upstream: nothing is ever written)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], held
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.slow
def test_a_stalled_download_stops_with_a_clear_message_and_leaves_no_worker(tmp_path: Path, silent_server,
                                                                            monkeypatch):
    build = tmp_path / "build"
    port, connections = silent_server
    _selected_part(build, [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(8)])
    cfg = DownloadConfig(allowed_networks=("127.0.0.1/32",), timeout=120, max_seconds=300, thread_count=4,
                         stall_timeout_s=20, progress_interval_s=1, number_sample_per_shard=8)
    drivers: list[int] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        drivers.append(proc.pid)
        return proc

    monkeypatch.setattr(download_module.subprocess, "Popen", recording_popen)
    started = time.monotonic()
    with pytest.raises(DownloadStalled, match="no progress for 20s"):
        download_selected(build, cfg)
    assert connections  # the workers were in the middle of fetches when the stall was called
    assert time.monotonic() - started < 90  # bounded: the fetches alone would take minutes
    assert len(drivers) == 1
    # The driver led its own session: nothing of that session (driver, spawned workers) may be left.
    assert _wait_dead(_session_members(drivers[0]), within_s=5) == []


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields after "(comm)": state, ppid, pgrp, session
                members.append(int(entry.name))
    return members
