"""Child processes die with the build.

A build's helpers (img2dataset's driver and its spawned workers) must not outlive the build: an orphan keeps writing
into the build folder, and with the build's in-process image proxy gone it records every remaining row as a failure
and finishes shards that are never retried. So each helper gets its own process group (session), which the build
kills as a whole on timeout, stall or error, and a watchdog inside the helper kills that group when the build dies
(the helper is reparented, so its parent pid changes; SIGKILL of the build, an OOM kill, leaves no other trace).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

WATCHDOG_POLL_S = 0.2


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still alive."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child started with start_new_session=True and everything in its group; reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def exit_with_parent(parent: int | None = None, poll_s: float = WATCHDOG_POLL_S) -> threading.Thread:
    """In a helper started in its own session: a daemon thread that SIGKILLs the helper's whole process group as soon
    as the process that started it is gone.

    `parent` is the pid the starter passed down. Pass it: a helper that reads its parent only when it gets here (after
    its imports, seconds under load) may already have been reparented by then, and would watch the wrong process
    forever (fault injection found such an orphan finishing its shards beside the rerun)."""
    parent = parent or os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="cc4m-exit-with-parent", daemon=True)
    thread.start()
    return thread
