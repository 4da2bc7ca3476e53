"""The project's one atomic write and one file hash. `curation`, `ovseg_core`, `flows` and the benchmarks all use
these (through `curation.io` or directly): `manifests` is the package every side may import.

Atomic means: the data goes to a temporary name in the target's folder, is fsynced, is renamed over the target, and
the folder is fsynced so the rename itself survives a power loss. A reader sees the old file or the new one, never a
partial write, and "the output exists" means "the unit is done". Temporaries of a killed writer are named
`.<name>.<random>.tmp` so `remove_stale_temporaries` can find them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
# Fault injection (benchmarks/bench_faults.py): with CC4M_FAILPOINT_WRITE=N the process SIGKILLs itself half-way
# through its N-th atomic write (the temporary holds half the data, nothing is renamed), as an OOM kill would.
# CC4M_WRITE_LOG=PATH appends every completed write's path, so a clean run tells which write belongs to which stage.
FAILPOINT_ENV = "CC4M_FAILPOINT_WRITE"
WRITE_LOG_ENV = "CC4M_WRITE_LOG"
_write_counter = itertools.count(1)
_counter_lock = threading.Lock()


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; when the block succeeds, fsync it, rename it onto `final` and fsync
    the folder. On failure the temporary is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; outputs are shared data, so give them the mode a plain open() would (umask applied).
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        _maybe_fail_mid_write(tmp_path)
        if tmp_path.is_file():
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
        _log_write(final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _maybe_fail_mid_write(tmp_path: Path) -> None:
    target = os.environ.get(FAILPOINT_ENV)
    if not target:
        return
    with _counter_lock:
        n = next(_write_counter)
    if n == int(target):
        if tmp_path.is_file():
            os.truncate(tmp_path, tmp_path.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def _log_write(final: Path) -> None:
    log_path = os.environ.get(WRITE_LOG_ENV)
    if log_path:
        with _counter_lock, open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{final}\n")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the `atomic_path` temporaries a killed writer left under `folder` (recursively). Call it only while
    holding the folder's lock: a live writer's temporary looks the same."""
    removed = []
    for path in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed
