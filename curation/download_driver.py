"""The img2dataset subprocess: started, watched (progress, stall, time limit) and stopped from the build's process,
and its entry point (`python -m curation.download_driver <json>`, main-guarded).

Why a subprocess: img2dataset uses a `spawn` multiprocessing pool (workers re-import `__main__`, which breaks under
Prefect's flow loader and hangs scripts without a main guard) and its own heavy imports; running it as this
main-guarded module isolates all of that. What runs there is `curation.download_worker` (img2dataset with the
guarded fetch and our decoder swapped in), with the unused heavy packages stood in for (`curation.import_standins`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curation.diskspace import NEARLY_FULL_BYTES, disk_full, free_bytes, is_disk_full
from curation.download_config import DISK_FULL_EXIT, DISK_FULL_SIGNAL, DRIVER_PID_ENV, DownloadConfig
from curation.fetch import FetchPolicy
from curation.import_standins import leave_unused_packages_unloaded
from curation.lifetime import exit_with_parent, group_alive, kill_process_group

log = logging.getLogger(__name__)

# The driver's exit code and log-line prefix for "the installed img2dataset is not the supported one": the parent
# raises that one line instead of a log tail.
UNSUPPORTED_EXIT = 3
UNSUPPORTED_MARK = "cc4m-unsupported: "

REPO_ROOT = Path(__file__).resolve().parent.parent

Progress = Callable[[dict[str, Any]], None]


def _stats_progress(output_folder: Path, total: int, done_before: int, started: float) -> dict[str, Any]:
    done = successes = 0
    for path in Path(output_folder).glob("*_stats.json"):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):  # being written: counted at the next poll
            continue
        done += int(stats.get("count", 0))
        successes += int(stats.get("successes", 0))
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = (done - done_before) / elapsed
    eta = (total - done) / rate if rate > 0 else None
    return {"stage": "download", "done": done, "total": total, "unit": "images", "rate": round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1), "successes": successes}


def _driver_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("WANDB_MODE", "disabled")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        env.pop(name, None)  # the guarded fetcher takes its proxy from the config only
    return env


def run_img2dataset(payload: dict[str, Any], cfg: DownloadConfig, log_path: Path, total: int,
                    progress: Progress | None = None) -> None:
    """Run img2dataset in a fresh interpreter (this module's main guard); raise with the log's tail on failure, or
    DiskFull in one line when a write of it found the disk full. While it runs, its finished shards'
    `*_stats.json` give the progress (logged, and passed to `progress`)."""
    output = Path(payload["img2dataset"]["output_folder"])
    cmd = [sys.executable, "-m", "curation.download_driver", json.dumps({**payload, "parent_pid": os.getpid()})]
    started = time.monotonic()
    done_before = _stats_progress(output, total, 0, started)["done"]
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd[:3])}\n".encode())
        log_file.flush()
        # Its own session: img2dataset's spawned workers join its group, so one killpg stops them all (lifetime).
        proc = subprocess.Popen(cmd, env=_driver_env(), stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=str(REPO_ROOT), start_new_session=True)
        try:
            _watch(proc, cfg, output, log_path, lambda: _report(
                _stats_progress(output, total, done_before, started), progress))
        finally:
            if proc.poll() is None or group_alive(proc.pid):
                kill_process_group(proc)
    _report(_stats_progress(output, total, done_before, started), progress)
    _raise_for_exit(proc.returncode, output, log_path)


def _watch(proc: subprocess.Popen, cfg: DownloadConfig, output: Path, log_path: Path,
           report: Callable[[], None]) -> None:
    """Until the driver exits: its time limit, a stall, a disk that filled up, and the progress report."""
    started = time.monotonic()
    stall = _StallWatch(output, cfg.stall_timeout_s)
    while True:
        try:
            proc.wait(timeout=cfg.progress_interval_s)
            return
        except subprocess.TimeoutExpired:
            pass
        if cfg.subprocess_timeout_s is not None and time.monotonic() - started > cfg.subprocess_timeout_s:
            raise DownloadStalled(f"download: img2dataset ran past subprocess_timeout_s={cfg.subprocess_timeout_s:g}s;"
                                  f" it and its workers were stopped (log {log_path})")
        if free_bytes(output) < NEARLY_FULL_BYTES:  # a write img2dataset retries quietly (its reader) fails here
            raise disk_full(output, "img2dataset and its workers were stopped")
        stall.check(log_path)
        report()


def _raise_for_exit(returncode: int, output: Path, log_path: Path) -> None:
    if returncode == DISK_FULL_EXIT:
        raise disk_full(output, "a write of the download failed; img2dataset and its workers were stopped")
    if returncode == UNSUPPORTED_EXIT:
        raise RuntimeError(_unsupported_line(log_path))
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"img2dataset subprocess failed with exit code {returncode}; log {log_path}:\n{tail}")


def _unsupported_line(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    return next((line[len(UNSUPPORTED_MARK):] for line in reversed(lines) if line.startswith(UNSUPPORTED_MARK)),
                f"img2dataset is not the supported version (log {log_path})")


class DownloadStalled(RuntimeError):
    """img2dataset ran past its time limit, or made no progress for stall_timeout_s (disk full, hung worker)."""


class _StallWatch:
    """No byte written under the staging round (tars, parquets, img2dataset's _tmp) and no new stats file for
    `timeout_s`: the download is stuck, e.g. on a full disk, where img2dataset waits forever."""

    def __init__(self, folder: Path, timeout_s: float) -> None:
        self.folder, self.timeout_s = folder, timeout_s
        self.last_state: tuple[int, int] | None = None
        self.last_change = time.monotonic()

    def _state(self) -> tuple[int, int]:
        size = files = 0
        for path in self.folder.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    size += path.stat().st_size
                    files += 1
        return size, files

    def check(self, log_path: Path) -> None:
        state = self._state()
        now = time.monotonic()
        if state != self.last_state:
            self.last_state, self.last_change = state, now
        elif now - self.last_change > self.timeout_s:
            raise DownloadStalled(
                f"download: no progress for {self.timeout_s:g}s (nothing written under {self.folder}): a full disk "
                f"or a hung worker? img2dataset and its workers were stopped; free space and rerun (finished shards "
                f"are kept). Log: {log_path}")


def _report(state: dict[str, Any], progress: Progress | None) -> None:
    eta = "?" if state["eta_s"] is None else f"{state['eta_s']:.0f}s"
    log.info("download: %d/%d images done, %d successes, %.1f images/s, ETA %s", state["done"], state["total"],
             state["successes"], state["rate"], eta)
    if progress is not None:
        progress({k: state[k] for k in ("stage", "done", "total", "unit", "rate", "eta_s")})


def driver_payload(cfg: DownloadConfig, urls_path: Path, output: Path) -> dict[str, Any]:
    policy = cfg.fetch_policy()
    return {"img2dataset": cfg.img2dataset_kwargs(urls_path, output), "max_pixels": cfg.max_pixels,
            "policy": {"allowed_networks": list(policy.allowed_networks), "max_bytes": policy.max_bytes,
                       "timeout": policy.timeout, "max_seconds": policy.max_seconds,
                       "max_redirects": policy.max_redirects, "proxy": policy.proxy,
                       "proxy_hosts": list(policy.proxy_hosts)}}


def _driver_main(argv: list[str]) -> int:
    """Entry point of the img2dataset subprocess: argv[0] is the JSON payload (img2dataset kwargs, fetch policy,
    pixel cap)."""
    payload = json.loads(argv[0])
    # First, before the heavy imports: an orphaned img2dataset must never write into the folder of a build that died.
    exit_with_parent(payload.get("parent_pid"))
    leave_unused_packages_unloaded()
    # A worker that finds the disk full signals this process (its pid reaches the spawned workers by environment).
    os.environ[DRIVER_PID_ENV] = str(os.getpid())
    signal.signal(DISK_FULL_SIGNAL, lambda *_: os._exit(DISK_FULL_EXIT))
    from curation import download_worker  # imported here: the parent process never pays for img2dataset
    try:
        download_worker.check_supported_img2dataset()
    except download_worker.UnsupportedImg2dataset as err:
        print(f"{UNSUPPORTED_MARK}{err}", flush=True)
        return UNSUPPORTED_EXIT
    policy = FetchPolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["policy"].items()})
    try:
        download_worker.run(payload["img2dataset"], policy, int(payload["max_pixels"]),
                            int(payload.get("start_shard", 0)))
    except OSError as err:
        if is_disk_full(err):
            os._exit(DISK_FULL_EXIT)  # not even a traceback: its log is on the full disk
        raise
    return 0


if __name__ == "__mp_main__":  # a process img2dataset's driver spawned (its workers, its logger) re-imports us so
    leave_unused_packages_unloaded()

if __name__ == "__main__":  # the spawn-safe guard img2dataset's worker pool needs
    sys.exit(_driver_main(sys.argv[1:]))
