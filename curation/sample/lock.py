"""Sample folders shared by several builds: one maker at a time, and never a remake under a running build.

- Making takes an exclusive `flock` on `<sample>/.cc4m-sample-make.lock` (a second maker waits, then finds the
  sample complete and reuses it instead of making it again);
- a SampleImageServer holds a shared lock on `<sample>/.cc4m-sample-serve.lock` while it serves;
- remaking a sample (absent, incomplete, or made with other parameters) needs that lock exclusively: while a build
  downloads from the folder, a maker that would replace its images stops with one line instead.
The kernel drops a lock when its holder dies, so nothing is ever left locked by a killed build.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from curation.lock import BuildLocked

log = logging.getLogger(__name__)

MAKE_LOCK = ".cc4m-sample-make.lock"
SERVE_LOCK = ".cc4m-sample-serve.lock"


class SampleInUse(BuildLocked):
    """The sample folder would have to be remade while a build is downloading from it (a folder in use, as a
    locked build folder is: the CLI says it in one line)."""


def _open(folder: Path, name: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def making(folder: str | Path) -> Iterator[None]:
    """One maker at a time (waits for another maker to finish)."""
    fd = _open(Path(folder), MAKE_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("sample %s: another process is making it; waiting for it to finish", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(folder: str | Path) -> Iterator[None]:
    """Exclusive against servers: raise SampleInUse at once when a build is downloading from `folder`."""
    fd = _open(Path(folder), SERVE_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SampleInUse(f"sample folder {folder} is being served to a running build and would have to be "
                              f"remade (it is incomplete or holds a sample with other settings); wait for that build, "
                              f"or use another --sample folder") from None
        yield
    finally:
        os.close(fd)


class ServingLock:
    """Shared lock held while a sample is served (SampleImageServer): makers may not replace it meanwhile."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is None:
            fd = _open(self.folder, SERVE_LOCK)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a maker is replacing the sample
            self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
