"""Report: a small build made by the real dedup and index stages (images injected) -> HTML, Markdown, valid PNGs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.dedup import DedupConfig, deduplicate
from curation.index import IndexConfig, build_index
from curation.layout import BuildLayout, part_name
from curation.report import report_markdown, write_report

CLASSES = ["dog", "cat", "people", "car", "bus", "tv"]


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_build(root: Path) -> BuildLayout:
    layout = BuildLayout(root)
    rng = np.random.default_rng(0)
    ids = list(range(40))
    entities = [sorted(set(rng.choice(CLASSES, rng.integers(1, 4)).tolist())) for _ in ids]
    table = pa.table(
        {
            "sample_id": pa.array(ids, pa.int64()),
            "url": [f"http://x.invalid/{i}" for i in ids],
            "caption": [" ".join(e) for e in entities],
            "entities": pa.array(entities, pa.list_(pa.string())),
        }
    )
    for d in (layout.captions_dir, layout.selected_dir):
        d.mkdir(parents=True)
        pq.write_table(table, d / part_name(0))
    status = ["failed_to_download" if i % 7 == 3 else "success" for i in ids]
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(ids, pa.int64()),
                "status": status,
                "error_message": [None if s == "success" else "timed out" for s in status],
            }
        ),
        layout.downloads,
    )
    images = {i: jpeg(i) for i in ids if status[i] == "success"}
    images[11] = images[2]  # one exact copy
    counts = deduplicate(root, DedupConfig(), images=list(images.items()))
    assert counts["exact_removed"] == 1
    build_index(root, IndexConfig(partners_per_sample=3))
    return layout


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 200 and im.height > 100


def test_report_files(tmp_path: Path) -> None:
    layout = make_build(tmp_path)
    html_path = write_report(layout.root)
    assert html_path == layout.report_dir / "index.html"
    for name in ("entity_histogram.png", "cooccurrence_heatmap.png", "download_outcomes.png"):
        assert_png(layout.report_dir / name)
        assert f"src='{name}'" in html_path.read_text()
    md = (layout.report_dir / "report.md").read_text()
    assert "| failed_to_download | 6 |" in md and "| success | 34 |" in md
    assert "| exact | 1 |" in md
    assert md == report_markdown(layout.root)


def test_report_uses_manifest_counts(tmp_path: Path) -> None:
    layout = make_build(tmp_path)
    layout.manifest.write_text(json.dumps({"stage_results": {"dedup": {"kept": 33, "checked": 34}, "shards": [1, 2]}}))
    md = report_markdown(layout.root)
    assert "Stage counts (manifest.json)" in md and "| dedup.kept | 33 |" in md and "| shards | 2 items |" in md


def test_report_on_an_early_build(tmp_path: Path) -> None:
    """Only captions so far: the class histogram comes from the captions, the other plots are absent."""
    layout = BuildLayout(tmp_path)
    layout.captions_dir.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array([0, 1], pa.int64()),
                "entities": pa.array([["dog"], ["dog", "cat"]], pa.list_(pa.string())),
            }
        ),
        layout.captions_dir / part_name(0),
    )
    write_report(tmp_path)
    assert_png(layout.report_dir / "entity_histogram.png")
    assert not (layout.report_dir / "download_outcomes.png").exists()
    assert "captions (no samples written yet)" in (layout.report_dir / "report.md").read_text()


def test_report_counts_download_failures_by_reason(tmp_path: Path) -> None:
    layout = make_build(tmp_path)
    table = pq.read_table(layout.downloads)
    failed = [s != "success" for s in table["status"].to_pylist()]
    reasons = ["blocked_address" if f and i % 2 else "timeout" if f else None for i, f in enumerate(failed)]
    table = table.append_column("reason", pa.array(reasons, pa.string()))
    table = table.append_column("transient", pa.array([None if r is None else r == "timeout" for r in reasons]))
    table = table.append_column("attempts", pa.array([1] * table.num_rows, pa.int32()))
    pq.write_table(table, layout.downloads)
    md = report_markdown(layout.root)
    assert "## Download failures by reason" in md
    assert "| blocked_address | permanent | 3 | 1 |" in md and "| timeout | transient | 3 | 1 |" in md
