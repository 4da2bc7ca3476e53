"""One build at a time in a build folder.

Two builds writing into one folder corrupt it for good (staging parquets, half-filled shard tars), so every build
holds an exclusive `flock` on `<build>/.cc4m-build.lock` for its whole run. The kernel drops the lock when the holder
dies, however it dies, so a lock left behind by a killed build is stale by construction: the next build takes it
over, says whose it was, and removes the temporaries the dead build left (only a lock holder may do that, since a
live writer's temporaries look the same). The file also records the holder (host, pid, start time, command) for the
message a second build gets.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from curation.io import remove_stale_temporaries
from manifests.layout import BuildLayout

log = logging.getLogger(__name__)

LOCK_NAME = ".cc4m-build.lock"


class BuildLocked(RuntimeError):
    """Another live build holds this build folder."""


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, int | float) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}: {holder.get('command', '?')}"


class BuildLock:
    """Context manager: `with BuildLock(build_dir): ...`. Raises BuildLocked at once if a live build holds it."""

    def __init__(self, build_dir: str | os.PathLike) -> None:
        self.build_dir = Path(build_dir)
        self.path = self.build_dir / LOCK_NAME
        self._fd: int | None = None
        self.previous_holder: dict[str, Any] | None = None
        self.removed_temporaries: list[Path] = []

    def _read_holder(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            return {"command": f"unreadable lock file content {raw[:80]!r}"}

    def acquire(self) -> BuildLock:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd) or {}
            os.close(fd)
            raise BuildLocked(f"build folder {self.build_dir} is in use by another build ({_describe(holder)}). "
                              "Wait for it to finish, or stop it; a killed build's lock is taken over "
                              "automatically.") from None
        self._fd = fd
        self.previous_holder = self._read_holder(fd)
        if self.previous_holder:
            log.warning("build: taking over the stale lock of a build that died (%s)", _describe(self.previous_holder))
        self._write_holder()
        self._clean_after_dead_builds()
        return self

    def _write_holder(self) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": round(time.time(), 3),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)
        os.fsync(self._fd)

    def _clean_after_dead_builds(self) -> None:
        self.removed_temporaries = remove_stale_temporaries(self.build_dir)
        scratch = BuildLayout(self.build_dir).staging_tmp_dir  # temporaries only a live img2dataset uses
        if scratch.exists():
            shutil.rmtree(scratch)
            self.removed_temporaries.append(scratch)
        if self.removed_temporaries:
            log.warning("build: removed %d temporaries left by an interrupted build, e.g. %s",
                        len(self.removed_temporaries), self.removed_temporaries[0])

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file means "released cleanly"
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
