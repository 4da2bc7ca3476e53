from __future__ import annotations

import argparse
import json

import pytest
from build_fixtures import write_staged_build

from curation.config import BuildConfig
from curation.manifest import ManifestCountError, add_verify_arguments, cli_verify, verify_manifest, write_manifest
from curation.reshard import ShardConfig, reshard
from manifests.layout import BuildLayout
from manifests.schema import BuildManifest, count_problems


@pytest.fixture()
def finished(tmp_path):
    root = tmp_path / "build"
    fx = write_staged_build(root)
    source = tmp_path / "source.tsv"
    source.write_text("irrelevant\n")
    cfg = BuildConfig(source=str(source), build_dir=str(root), shard=ShardConfig(samples_per_shard=6))
    results = {"ingest": {"read": 26 + fx["n_rejects"], "ingested": 26, "rejected": fx["n_rejects"],
                          "source_sha256": "0" * 64, "source_rows": 28},
               "select": [fx["select"]], "reshard": reshard(root, cfg.shard)}
    return root, cfg, results, fx


def test_manifest_counts_add_up(finished):
    root, cfg, results, _ = finished
    path = write_manifest(root, cfg, results)
    manifest = BuildManifest.load(path)
    c = manifest.counts
    assert c["ingest"] == {"read": 28, "ingested": 26, "rejected": 2, "rejected_by_reason": {"missing_tab": 2}}
    assert c["select"]["parsed"] == 26 and c["select"]["selected"] == 22
    assert c["select"]["dropped_by_reason"]["no_entity"] == 4
    assert c["download"]["success"] == 21 and c["download"]["failed_by_reason"] == {"http_404": 1}
    assert c["download"]["failed_by_status"]["failed_to_download"] == 1
    assert c["dedup"]["removed_duplicate"] == 1 and c["dedup"]["kept"] == 20
    assert c["reshard"]["written"] == 20 == sum(s.samples for s in manifest.shards)
    assert c["index"]["samples_without_partners"] == 4
    assert [s.name for s in manifest.shards] == [p.name for p in BuildLayout(root).shards()]
    assert {f.path for f in manifest.files} >= {"meta/part-00000.parquet", "index/locator.parquet",
                                                "index/partners.parquet", "kept.parquet", "selected/part-00000.parquet",
                                                "captions/part-00000.parquet", "ingest/part-00000.parquet"}
    assert "downloads.parquet" not in {f.path for f in manifest.files}  # run-specific: checked by invariants
    assert manifest.inputs.rows == 28 and manifest.vocabulary_version == "cc4m-vocab-v1"

    # Rerun on an unchanged build: the manifest is left as is.
    mtime = path.stat().st_mtime_ns
    assert write_manifest(root, cfg, results) == path and path.stat().st_mtime_ns == mtime

    report = verify_manifest(path)
    assert report.ok, report.problems
    assert report.shards_checked == 4 and report.samples_checked == 20


def test_tampered_counts_raise(finished):
    root, cfg, results, _ = finished
    bad = {**results, "ingest": {**results["ingest"], "read": 29}}
    with pytest.raises(ManifestCountError, match="read"):
        write_manifest(root, cfg, bad)
    bad = {**results, "reshard": {**results["reshard"], "written": 19}}
    with pytest.raises(ManifestCountError, match="written"):
        write_manifest(root, cfg, bad)
    assert not BuildLayout(root).manifest.exists()

    counts = json.loads(write_manifest(root, cfg, results).read_text())["counts"]
    assert count_problems(counts) == []
    counts["dedup"]["kept"] += 1
    problems = count_problems(counts)
    assert any("success = kept + removed_duplicate" in p for p in problems)


def test_verify_detects_tampering(finished, capsys):
    root, cfg, results, _ = finished
    path = write_manifest(root, cfg, results)
    parser = argparse.ArgumentParser()
    add_verify_arguments(parser)
    args = parser.parse_args([str(path)])
    assert cli_verify(args) == 0
    assert "OK" in capsys.readouterr().out

    shard = BuildLayout(root).shards()[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # one bit, same size
    shard.write_bytes(bytes(data))
    report = verify_manifest(path)
    assert not report.ok and any(shard.name in p and "sha256" in p for p in report.problems)
    assert cli_verify(args) == 1
    assert "MISMATCH" in capsys.readouterr().out

    shard.write_bytes(bytes(data[:-1024]))  # truncated: size and tar members
    assert any("bytes" in p for p in verify_manifest(path).problems)
    (BuildLayout(root).meta_dir / "part-00000.parquet").write_bytes(b"tampered")
    assert any("meta/part-00000.parquet" in p for p in verify_manifest(path).problems)
