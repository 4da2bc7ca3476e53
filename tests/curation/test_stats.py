"""DuckDB views and statistics over a hand-made build whose counts are known."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.index import IndexConfig, build_index
from curation.stats import (
    READY_QUERIES,
    add_sql_arguments,
    add_stats_arguments,
    cli_sql,
    cli_stats,
    connect,
    run_sql,
    stats_text,
    view_names,
)
from manifests.layout import BuildLayout, part_name

ENTITIES = {0: ["dog"], 1: ["cat", "dog"], 2: ["car"], 3: ["dog", "people"], 4: ["cat"], 5: ["bus", "dog"]}
STATUS = {0: "success", 1: "success", 2: "failed_to_download", 3: "success", 4: "success", 5: "success"}
DUPLICATES = {4: (1, "near", 3)}  # 4 is a near copy of 1
WORD_TYPE = pa.struct([("word", pa.string()), ("class", pa.string()), ("start", pa.int32()), ("end", pa.int32())])


def captions_table(ids: list[int]) -> pa.Table:
    return pa.table(
        {
            "sample_id": pa.array(ids, pa.int64()),
            "url": [f"http://x.invalid/{i}.jpg" for i in ids],
            "caption": [" and ".join(ENTITIES.get(i, ["nothing"])) for i in ids],
            "entities": pa.array([ENTITIES.get(i, []) for i in ids], pa.list_(pa.string())),
            "entity_words": pa.array([[] for _ in ids], pa.list_(WORD_TYPE)),
        }
    )


def make_build(root: Path, with_meta: bool = True) -> BuildLayout:
    layout = BuildLayout(root)
    for d in (layout.captions_dir, layout.selected_dir, layout.rejects_dir):
        d.mkdir(parents=True)
    pq.write_table(captions_table([0, 1, 2, 6]), layout.captions_dir / part_name(0))  # 6 has no entity
    pq.write_table(captions_table([3, 4, 5]), layout.captions_dir / part_name(1))
    pq.write_table(captions_table([0, 1, 2]), layout.selected_dir / part_name(0))
    pq.write_table(captions_table([3, 4, 5]), layout.selected_dir / part_name(1))
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array([7], pa.int64()),
                "line": pa.array([8], pa.int64()),
                "raw": ["no tab here"],
                "reason": ["missing_tab"],
            }
        ),
        layout.rejects_dir / part_name(1),
    )
    ids = sorted(STATUS)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(ids, pa.int64()),
                "status": [STATUS[i] for i in ids],
                "error_message": [None if STATUS[i] == "success" else "HTTP Error 404" for i in ids],
            }
        ),
        layout.downloads,
    )
    dup_ids = sorted(DUPLICATES)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(dup_ids, pa.int64()),
                "duplicate_of": pa.array([DUPLICATES[i][0] for i in dup_ids], pa.int64()),
                "kind": [DUPLICATES[i][1] for i in dup_ids],
                "distance": pa.array([DUPLICATES[i][2] for i in dup_ids], pa.int32()),
            }
        ),
        layout.duplicates,
    )
    kept = [i for i in ids if STATUS[i] == "success" and i not in DUPLICATES]
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(kept, pa.int64()),
                "entities": pa.array([ENTITIES[i] for i in kept], pa.list_(pa.string())),
            }
        ),
        layout.kept,
    )
    build_index(root, IndexConfig(partners_per_sample=2, seed=0))
    if with_meta:
        layout.meta_dir.mkdir()
        pq.write_table(
            pa.table(
                {
                    "sample_id": pa.array(kept, pa.int64()),
                    "shard": ["cc4m-000000.tar"] * len(kept),
                    "position": pa.array(range(len(kept)), pa.int32()),
                    "entities": pa.array([ENTITIES[i] for i in kept], pa.list_(pa.string())),
                    "width": pa.array([64] * len(kept), pa.int32()),
                }
            ),
            layout.meta_dir / part_name(0),
        )
    return layout


def test_views_answer_queries(tmp_path: Path) -> None:
    layout = make_build(tmp_path)
    con = connect(layout.root)
    assert {
        "samples",
        "entities",
        "partners",
        "cooccurrence",
        "downloads",
        "rejects",
        "duplicates",
        "entity_index",
        "captions",
        "selected",
        "kept",
        "meta",
    } <= view_names(con)
    assert "locator" not in view_names(con)  # no file, no view
    # kept = successes (0,1,3,4,5) minus duplicate 4
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 4
    assert con.execute("SELECT url FROM samples WHERE sample_id = 3").fetchone()[0] == "http://x.invalid/3.jpg"
    freq = dict(con.execute(READY_QUERIES["entity_frequency"]).fetchall())
    assert freq == {"dog": 4, "cat": 1, "people": 1, "bus": 1}
    outcomes = dict(con.execute(READY_QUERIES["download_outcomes"]).fetchall())
    assert outcomes == {"success": 5, "failed_to_download": 1}
    assert dict(con.execute(READY_QUERIES["captions_per_class"]).fetchall())["dog"] == 4
    assert con.execute("SELECT count(*) FROM cooccurrence WHERE class_a = 'cat' AND class_b = 'dog'").fetchone()[0] == 1
    # every kept sample shares "dog" with someone except nobody: all 4 have dog -> 2 partners each
    assert con.execute(READY_QUERIES["partners_per_sample"]).fetchall() == [(2, 4)]
    for query in READY_QUERIES.values():
        con.execute(query).fetchall()  # every ready query runs on a complete build
    con.close()


def test_samples_view_before_reshard(tmp_path: Path) -> None:
    layout = make_build(tmp_path, with_meta=False)
    columns, rows = run_sql(
        layout.root, "SELECT sample_id, selected, download_status, kept FROM samples ORDER BY sample_id"
    )
    assert columns == ["sample_id", "selected", "download_status", "kept"]
    assert rows[2] == (2, True, "failed_to_download", False)
    assert rows[4] == (4, True, "success", False)  # the duplicate
    assert rows[6] == (6, False, None, False)
    # entities fall back to kept.parquet
    assert run_sql(layout.root, "SELECT count(*) FROM entities")[1] == [(7,)]


def test_stats_text_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = make_build(tmp_path)
    text = stats_text(layout.root)
    for title in ("Entity frequencies", "Top co-occurring", "Download outcomes", "Duplicates", "Captions per class"):
        assert title in text
    assert "HTTP Error 404" in text

    parser = argparse.ArgumentParser()
    add_stats_arguments(parser)
    assert cli_stats(parser.parse_args([str(layout.root)])) == 0
    assert "Entity frequencies" in capsys.readouterr().out

    parser = argparse.ArgumentParser()
    add_sql_arguments(parser)
    assert (
        cli_sql(
            parser.parse_args([str(layout.root), ("SELECT status, count(*) AS n FROM downloads GROUP BY 1 ORDER BY 1")])
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "failed_to_download  1" in out and "success             5" in out
    assert cli_sql(parser.parse_args([str(layout.root), "--ready", "duplicates_by_kind", "--format", "csv"])) == 0
    assert "near,1,3.0,3" in capsys.readouterr().out
    assert cli_sql(parser.parse_args([str(layout.root)])) == 0  # no query: the view definitions
    out = capsys.readouterr().out
    assert "CREATE OR REPLACE VIEW partners" in out and "duckdb -init" in out
    views_sql = (layout.root / "views.sql").read_text()
    import duckdb

    con = duckdb.connect()
    con.execute(views_sql)
    assert con.execute("SELECT count(*) FROM entities").fetchone()[0] == 7
    assert cli_sql(parser.parse_args([str(layout.root), "SELECT * FROM no_such_view"])) == 2
    assert "error" in capsys.readouterr().err
