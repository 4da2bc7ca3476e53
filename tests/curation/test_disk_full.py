"""A full disk fails the download at once, in one line naming the folder and its free space. No small filesystem
can be mounted without root, so ENOSPC is injected in the middle of the writes of each process of the download:
a worker's staging writer (sitecustomize in every process the driver spawns), the driver's own writes, and the
build process's writes."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from build_fixtures import ImageServer, caption_rows, make_jpeg, write_part

from curation import diskspace, download, download_driver
from curation.build import user_error_message
from curation.diskspace import DiskFull
from curation.download import DownloadConfig, download_selected
from manifests.layout import BuildLayout, part_name

IDS = list(range(1, 13))


def _routes() -> dict:
    return {f"/img/{sid}.jpg": (200, make_jpeg(sid), "image/jpeg") for sid in IDS}


def _selected(root: Path) -> BuildLayout:
    layout = BuildLayout(root)
    write_part(layout.selected_dir / part_name(0), caption_rows(IDS, "http://cc4m-sample.invalid"))
    return layout


def _inject_in_every_process(tmp_path: Path, monkeypatch, code: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def _cfg(server: ImageServer) -> DownloadConfig:
    # A long stall timeout: only the disk-full path may end this download early.
    return DownloadConfig(image_size=32, thread_count=2, timeout=5, number_sample_per_shard=4,
                          http_proxy=server.base_url, progress_interval_s=0.5, stall_timeout_s=600)


def _assert_one_line(err: BaseException, folder: Path) -> None:
    message = str(err)
    assert "\n" not in message and f"no space left on the disk holding {folder}" in message
    assert " free" in message and isinstance(err, OSError) and err.errno == errno.ENOSPC


def _download_ends_with_disk_full(tmp_path):
    """Download the selected rows; the download must stop with DiskFull within a minute. (layout, the error)"""
    with ImageServer(_routes()) as server:
        layout = _selected(tmp_path / "build")
        started = time.monotonic()
        with pytest.raises(DiskFull) as err:
            download_selected(layout.root, _cfg(server))
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed
    return layout, err.value


def test_enospc_in_a_workers_staging_writer_stops_the_download_at_once(tmp_path, monkeypatch):
    # The third image member a worker writes fails as a full disk would (half of it written first).
    _inject_in_every_process(tmp_path, monkeypatch, (
        "import errno\n"
        "import curation.tario as t\n"
        "_add, _n = t.ShardWriter.add, [0]\n"
        "def add(self, name, data):\n"
        "    _n[0] += 1\n"
        "    if _n[0] == 3:\n"
        "        self.fh.write(data[: len(data) // 2])\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _add(self, name, data)\n"
        "t.ShardWriter.add = add\n"))
    layout, err = _download_ends_with_disk_full(tmp_path)
    _assert_one_line(err, layout.staging_dir)
    assert "a write of the download failed" in str(err)
    assert not layout.downloads.exists()  # nothing claims the download finished
    assert user_error_message(err, None, str(layout.root)) == str(err)  # the CLI's line


def test_enospc_in_the_drivers_writes_stops_the_download_at_once(tmp_path, monkeypatch):
    # The driver's first write to its log (img2dataset's start line) fails: its log is on the full disk.
    _inject_in_every_process(tmp_path, monkeypatch, (
        "import errno, sys\n"
        "class _FullDisk:\n"
        "    def write(self, text):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    def flush(self):\n"
        "        pass\n"
        "if sys.argv[1:2] and sys.argv[1].startswith('{\"img2dataset\"'):  # the driver: -m <payload>\n"
        "    sys.stdout = _FullDisk()\n"))
    layout, err = _download_ends_with_disk_full(tmp_path)
    _assert_one_line(err, layout.staging_dir)


def test_a_disk_that_fills_up_under_a_quiet_retry_is_caught_by_the_watcher(tmp_path, monkeypatch):
    """img2dataset's reader retries a failing write 100 times, silently: the watcher sees the disk is full."""
    monkeypatch.setattr(download_driver, "free_bytes", lambda folder: 100_000)
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 100_000)
    layout, err = _download_ends_with_disk_full(tmp_path)
    _assert_one_line(err, layout.staging_dir)
    assert "97.7 KB free" in str(err)


def test_enospc_in_the_build_process_writes_is_one_line(tmp_path, monkeypatch):
    def full(path, table, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"PAR1")  # half-way
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with ImageServer(_routes()) as server:
        layout = _selected(tmp_path / "build")
        monkeypatch.setattr(download, "write_parquet_atomic", full)
        with pytest.raises(DiskFull) as err:
            download_selected(layout.root, _cfg(server))
    _assert_one_line(err.value, layout.root)


def test_a_short_disk_is_warned_about_before_the_download(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 1_000_000)
    with ImageServer(_routes()) as server:
        layout = _selected(tmp_path / "build")
        with caplog.at_level("WARNING", logger="curation.diskspace"):
            download_selected(layout.root, DownloadConfig(image_size=512, thread_count=2, timeout=5,
                                                          http_proxy=server.base_url))
    warning = [r.getMessage() for r in caplog.records if r.name == "curation.diskspace"]
    assert len(warning) == 1, warning
    assert f"12 images at 512 px are expected to need about 3.0 MB (staging + shards), but the disk holding " \
           f"{layout.root} has 976.6 KB free" in warning[0]
    assert pq.read_table(layout.downloads).num_rows == len(IDS)  # a warning, not a refusal
