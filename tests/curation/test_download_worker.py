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
