"""Report: a small build made by the real dedup and index stages (images injected) -> HTML, Markdown, valid PNGs."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.dedup import DedupConfig, deduplicate
from curation.index import IndexConfig, build_index
from curation.report import report_markdown, write_report
from curation.stats import READY_QUERIES, connect
from manifests.layout import BuildLayout, part_name

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


SVG = "{http://www.w3.org/2000/svg}"


def duckdb_rows(layout: BuildLayout, sql: str) -> list[tuple]:
    con = connect(layout.root)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def svg_rects(path: Path, fill: str | None = None) -> list[ET.Element]:
    """The plot's rectangles (of one colour): parsing fails on anything but well-formed SVG."""
    root = ET.fromstring(path.read_bytes())
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 200 and float(root.get("height")) > 100
    return [r for r in root.iter(f"{SVG}rect") if fill is None or r.get("fill") == fill]


def bar_heights(path: Path) -> dict[str, float]:
    """Bar chart: class -> bar height, from each bar's tooltip."""
    return {r.find(f"{SVG}title").text.split(":")[0]: float(r.get("height")) for r in svg_rects(path, "#3b75af")}


def test_report_files(tmp_path: Path) -> None:
    layout = make_build(tmp_path)
    html_path = write_report(layout.root)
    assert html_path == layout.report_dir / "index.html"
    for name in ("entity_histogram.svg", "cooccurrence_heatmap.svg", "download_outcomes.svg"):
        assert svg_rects(layout.report_dir / name)
        assert f"src='{name}'" in html_path.read_text()
    # the histogram has one bar per vocabulary class, as tall as its count of written samples
    heights = bar_heights(layout.report_dir / "entity_histogram.svg")
    frequency = dict(duckdb_rows(layout, READY_QUERIES["entity_frequency"]))
    assert len(heights) >= 73 and max(frequency.values()) > 0
    top = max(frequency, key=frequency.get)
    for cls, height in heights.items():
        assert height == pytest.approx(heights[top] * frequency.get(cls, 0) / frequency[top], abs=0.1), cls
    # the outcomes chart: a green success bar and a red failure bar, longest for the larger count (34 vs 6)
    green = svg_rects(layout.report_dir / "download_outcomes.svg", "#4c9a2a")
    red = svg_rects(layout.report_dir / "download_outcomes.svg", "#c0392b")
    assert len(green) == len(red) == 1 and float(green[0].get("width")) > 5 * float(red[0].get("width"))
    # the heatmap: a square of class x class cells
    n = len(heights)
    assert len(svg_rects(layout.report_dir / "cooccurrence_heatmap.svg")) >= n * n
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
    heights = bar_heights(layout.report_dir / "entity_histogram.svg")
    assert heights["dog"] == 2 * heights["cat"] > 0 and heights["car"] == 0  # counted from the captions
    assert not (layout.report_dir / "download_outcomes.svg").exists()
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
