"""The staging writer the download workers use, against img2dataset's own webdataset writer."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from build_fixtures import make_jpeg
from img2dataset.writer import WebDatasetSampleWriter

from curation import tario
from curation.download_worker import StagingSampleWriter
from curation.imagehash import stored_hashes

SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("sample_id", pa.int64()), ("key", pa.string()),
                    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                    ("height", pa.int32()), ("sha256", pa.string())])


def _write(writer_class, folder: Path, rows: list[tuple]) -> None:
    folder.mkdir()
    writer = writer_class(3, str(folder), True, 5, SCHEMA, "jpg")
    for img, key, caption, meta in rows:
        writer.write(img, key, caption, dict(meta))
    writer.close()


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_staging_writer_writes_img2datasets_files_plus_the_stored_hashes(tmp_path):
    images = [make_jpeg(i, (64, 48)) for i in range(4)]
    rows = []
    for i, img in enumerate(images):
        key = f"00003{i:04d}"
        failed = i == 2
        meta = {"url": f"http://x.invalid/{i}.jpg", "caption": f"a dog {i}", "sample_id": 30 + i, "key": key,
                "status": "failed_to_download" if failed else "success",
                "error_message": "http_404: not found" if failed else None, "width": None if failed else 64,
                "height": None if failed else 48, "sha256": None}
        rows.append((None if failed else img, key, f"a dog {i}" if i != 3 else None, meta))
    _write(WebDatasetSampleWriter, tmp_path / "theirs", rows)
    _write(StagingSampleWriter, tmp_path / "ours", rows)

    theirs, ours = _members(tmp_path / "theirs" / "00003.tar"), _members(tmp_path / "ours" / "00003.tar")
    assert [name for name, _ in ours] == [name for name, _ in theirs]  # same members, same order (no failed row)
    assert len(ours) == 3 * 3
    for (name, mine), (_, other) in zip(ours, theirs, strict=True):
        if name.endswith(".json"):
            doc = json.loads(mine)
            sha, phash = doc.pop("stored_sha256"), doc.pop("stored_phash")
            assert doc == json.loads(other)
            assert (sha, phash) == stored_hashes(dict(ours)[name.replace(".json", ".jpg")])
        else:
            assert mine == other
    assert tario._fast_scan(tmp_path / "ours" / "00003.tar") is not None  # plain USTAR: the fast scan reads it

    table = pq.read_table(tmp_path / "ours" / "00003.parquet")
    assert table.drop_columns(["stored_sha256", "stored_phash"]).equals(
        pq.read_table(tmp_path / "theirs" / "00003.parquet"))
    hashes = [stored_hashes(img) if img is not None else (None, None) for img, *_ in rows]
    assert table["stored_sha256"].to_pylist() == [h[0] for h in hashes]
    assert table["stored_phash"].to_pylist() == [h[1] for h in hashes]


def test_the_download_processes_leave_torch_wandb_and_albumentations_unloaded_and_fail_loudly_if_used():
    """In a fresh interpreter, as the img2dataset driver: img2dataset and our worker import without those packages,
    and touching one names the reason."""
    import subprocess
    import sys

    from curation.download_driver import REPO_ROOT

    code = (
        "import sys\n"
        "from curation.import_standins import leave_unused_packages_unloaded\n"
        "leave_unused_packages_unloaded()\n"
        "import img2dataset, curation.download_worker\n"
        "assert 'torch' not in sys.modules, 'torch was loaded'\n"
        "import webdataset\n"
        "try:\n"
        "    webdataset.TarWriter\n"
        "except AttributeError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "webdataset.TarWriter: webdataset is not loaded in cc4m's download processes" in done.stdout


def test_an_unsupported_img2dataset_is_refused_in_one_line_naming_the_supported_version(monkeypatch):
    import importlib.metadata

    import img2dataset.downloader as i2d_downloader
    import pytest

    from curation import download_worker

    download_worker.check_supported_img2dataset()  # the installed one is the supported one

    def upstream_master(row, timeout, retries, user_agent_token, disallowed_header_directives, proxies=None):
        raise AssertionError("never called")

    monkeypatch.setattr(i2d_downloader, "download_image_with_retry", upstream_master)
    with pytest.raises(download_worker.UnsupportedImg2dataset) as err:
        download_worker.check_supported_img2dataset()
    message = str(err.value)
    assert "\n" not in message and "img2dataset==1.47.0" in message
    assert "img2dataset.downloader.download_image_with_retry changed signature" in message
    monkeypatch.undo()
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "1.48.0" if name == "img2dataset" else real_version(name))
    with pytest.raises(download_worker.UnsupportedImg2dataset, match=r"img2dataset==1\.47\.0 only \(img2dataset "
                                                                        r"1\.48\.0 is installed\)"):
        download_worker.check_supported_img2dataset()


def _site_hook(folder: Path, code: str) -> dict[str, str]:
    """Environment whose Python processes (the driver and everything it spawns) run `code` first (sitecustomize)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_the_download_stops_on_an_unsupported_img2dataset_with_that_one_line(tmp_path, monkeypatch):
    import pytest
    from build_fixtures import caption_rows, write_part

    from curation.download import DownloadConfig, download_selected
    from manifests.layout import BuildLayout, part_name

    hook = ("import importlib.metadata as m\n_real = m.version\n"
            "m.version = lambda name: '1.48.0' if name == 'img2dataset' else _real(name)\n")
    for key, value in _site_hook(tmp_path / "site", hook).items():
        monkeypatch.setenv(key, value)
    layout = BuildLayout(tmp_path / "build")
    write_part(layout.selected_dir / part_name(0), caption_rows([1, 2], "http://cc4m-sample.invalid"))
    with pytest.raises(RuntimeError) as err:
        download_selected(layout.root, DownloadConfig(image_size=32, thread_count=2))
    assert str(err.value) == ("cc4m's download supports img2dataset==1.47.0 only (img2dataset 1.48.0 is installed); "
                              "install it: pip install img2dataset==1.47.0")
    assert not list(layout.staging_dir.glob("*_stats.json"))  # stopped before any shard


def test_the_spawned_workers_and_the_logger_really_run_without_torch_wandb_and_albumentations(tmp_path, monkeypatch):
    """A real download with an import spy in every process it starts (sitecustomize): the driver, img2dataset's
    spawned pool worker and its logger process each record themselves, and any real import of the three packages
    (or of torch through them) would be recorded too."""
    from build_fixtures import ImageServer, caption_rows, make_jpeg, write_part

    from curation.download import DownloadConfig, download_selected
    from manifests.layout import BuildLayout, part_name

    spy = tmp_path / "spy"
    hook = (
        "import os, sys\n"
        f"_dir = {str(spy)!r}\n"
        "os.makedirs(_dir, exist_ok=True)\n"
        "with open(os.path.join(_dir, f'{os.getpid()}.start'), 'w') as f: f.write(' '.join(sys.argv))\n"
        "class _Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'wandb', 'albumentations', 'webdataset'):\n"
        "            with open(os.path.join(_dir, f'{os.getpid()}.imported'), 'a') as f: f.write(name + '\\n')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Spy())\n"
    )
    for key, value in _site_hook(tmp_path / "site", hook).items():
        monkeypatch.setenv(key, value)
    ids = [1, 2, 3, 4]
    routes = {f"/img/{sid}.jpg": (200, make_jpeg(sid), "image/jpeg") for sid in ids}
    with ImageServer(routes) as server:
        layout = BuildLayout(tmp_path / "build")
        write_part(layout.selected_dir / part_name(0), caption_rows(ids, "http://cc4m-sample.invalid"))
        result = download_selected(layout.root, DownloadConfig(image_size=32, thread_count=2, timeout=5,
                                                               http_proxy=server.base_url))
    assert result["success"] == 4
    started = {p.stem: p.read_text() for p in spy.glob("*.start")}
    driver = [pid for pid, argv in started.items() if argv.startswith("-m {\"img2dataset\"")]
    spawned = [pid for pid, argv in started.items() if "--multiprocessing-fork" in argv]
    assert len(driver) == 1 and len(spawned) >= 2, started  # the pool worker and the logger (+ resource tracker)
    imported = {p.stem: p.read_text().split() for p in spy.glob("*.imported")}
    assert not {pid: names for pid, names in imported.items() if pid in driver + spawned}, imported
