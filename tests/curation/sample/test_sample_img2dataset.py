"""End to end: img2dataset downloads the sample through the sample server (a subprocess with http_proxy set)."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.sample import SampleInfo, read_caption_rows
from curation.sample.img2dataset_check import run_img2dataset

EXPECTED_STATUS = {
    "image": "success",
    "404": "failed_to_download",
    "500": "failed_to_download",
    "slow": "failed_to_download",
    "corrupt": "failed_to_resize",
    "notimage": "failed_to_resize",
}


@pytest.mark.slow
def test_img2dataset_through_the_server(small_sample: SampleInfo, tmp_path: Path) -> None:
    rows = [r for r in read_caption_rows(small_sample.source_tsv) if r.kind in EXPECTED_STATUS]
    result = run_img2dataset(
        small_sample.root,
        tmp_path / "i2d",
        rows=[r.sample_id for r in rows],
        timeout=2.0,
        processes=1,
        threads=16,
        image_size=64,
        slow_seconds=6.0,
    )
    expected = {r.sample_id: EXPECTED_STATUS[r.kind] for r in rows}
    assert result["status_by_sample_id"] == expected
    assert result["count"] == len(rows) == 58
    assert result["successes"] == sum(1 for s in expected.values() if s == "success")
    assert result["failed_to_download"] == 3 and result["failed_to_resize"] == 2
