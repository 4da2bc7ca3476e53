from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from build_fixtures import caption_rows, write_part

from curation.select import SelectConfig, select_part, selected_counts
from manifests.layout import BuildLayout, part_name


def _rows():
    rows = caption_rows(range(10), "http://x", classes=("dog", "car", "cat"), empty_every=4)  # ids 0, 4, 8: no class
    rows[1]["entities"], rows[1]["entity_words"] = ["dog"], rows[1]["entity_words"][:1]
    rows[1]["entities"] = [rows[1]["entity_words"][0]["class"]]
    return rows


def test_select_counts_and_rows(tmp_path):
    layout = BuildLayout(tmp_path)
    write_part(layout.captions_dir / part_name(0), _rows())
    result = select_part(tmp_path, part_name(0), SelectConfig())
    assert result["parsed"] == 10 and result["selected"] == 7 and result["dropped"] == 3
    assert result["dropped_by_reason"] == {"no_entity": 3, "no_allowed_entity": 0, "too_few_entities": 0}
    assert result["skipped"] is False
    table = pq.read_table(layout.selected_dir / part_name(0))
    assert table["sample_id"].to_pylist() == [1, 2, 3, 5, 6, 7, 9]
    assert table.schema.metadata[b"cc4m.vocabulary"] == b"cc4m-vocab-v1"  # parse's metadata is kept

    mtime = (layout.selected_dir / part_name(0)).stat().st_mtime_ns
    again = select_part(tmp_path, part_name(0), SelectConfig())
    assert again["skipped"] is True and again["selected"] == 7
    assert (layout.selected_dir / part_name(0)).stat().st_mtime_ns == mtime
    assert selected_counts(tmp_path)["dropped_by_reason"]["no_entity"] == 3


def test_min_entities_and_allow_list(tmp_path):
    layout = BuildLayout(tmp_path)
    write_part(layout.captions_dir / part_name(0), _rows())
    result = select_part(tmp_path, part_name(0), SelectConfig(min_entities=2))
    assert result["selected"] == 6 and result["dropped_by_reason"]["too_few_entities"] == 1

    # A changed config redoes the part; the allow-list also restricts entities and entity_words.
    result = select_part(tmp_path, part_name(0), SelectConfig(allowed_classes=("dog",)))
    assert result["skipped"] is False
    table = pq.read_table(layout.selected_dir / part_name(0)).to_pylist()
    assert all(r["entities"] == ["dog"] for r in table)
    assert all([w["class"] for w in r["entity_words"]] == ["dog"] for r in table)
    assert result["parsed"] == result["selected"] + sum(result["dropped_by_reason"].values())
    assert result["dropped_by_reason"]["no_allowed_entity"] == 10 - 3 - result["selected"]


def test_bad_config_and_input(tmp_path):
    with pytest.raises(ValueError, match="min_entities"):
        SelectConfig(min_entities=0)
    with pytest.raises(ValueError, match="not in vocabulary"):
        SelectConfig(allowed_classes=("unicorn",))
    with pytest.raises(FileNotFoundError, match="parse"):
        select_part(tmp_path, part_name(0), SelectConfig())
