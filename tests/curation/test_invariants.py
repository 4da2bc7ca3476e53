"""Every build invariant can fail: tamper with one file, and both manifest writing and `cc4m verify` name the broken
invariant. The tampering keeps each file valid (a parquet stays a parquet, a tar a tar), so only the rule catches it."""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from build_fixtures import write_staged_build

from curation.config import BuildConfig
from curation.invariants import check_invariants
from curation.manifest import ManifestCountError, verify_manifest, write_manifest
from curation.reshard import ShardConfig, reshard
from manifests.layout import BuildLayout


def _rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


def _drop_first(path: Path) -> None:
    _rewrite(path, lambda t: t.slice(1))


def _set(path: Path, column: str, row: int, value) -> None:
    def change(table: pa.Table) -> pa.Table:
        values = table[column].to_pylist()
        values[row] = value
        return table.set_column(table.column_names.index(column), column, pa.array(values, table[column].type))
    _rewrite(path, change)


def _rewrite_tar(path: Path, keep: Callable[[str, int], bool]) -> None:
    """Rewrite a shard tar keeping the members for which keep(name, sample_index) is true."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = list(dict.fromkeys(m.name.rpartition(".")[0] for m, _ in members))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as out:
        for member, data in members:
            if keep(member.name, keys.index(member.name.rpartition(".")[0])):
                out.addfile(member, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def _first_kept(layout: BuildLayout) -> int:
    return pq.read_table(layout.kept)["sample_id"][0].as_py()


def _unindex_first_kept(layout: BuildLayout) -> None:
    gone = _first_kept(layout)

    def change(table: pa.Table) -> pa.Table:
        lists = [[i for i in ids if i != gone] for ids in table["sample_ids"].to_pylist()]
        return table.set_column(table.column_names.index("sample_ids"), "sample_ids",
                                pa.array(lists, table["sample_ids"].type))
    _rewrite(layout.entity_index, change)


def _duplicate_reject_id(layout: BuildLayout) -> None:
    ingested = pq.read_table(layout.parts(layout.ingest_dir)[0])["sample_id"][0].as_py()
    _set(layout.parts(layout.rejects_dir)[0], "sample_id", 0, ingested)


def _edit_source_rows(layout: BuildLayout) -> None:
    done = layout.ingest_dir / "ingest-done.json"
    record = json.loads(done.read_text())
    record["result"]["source_rows"] += 1
    done.write_text(json.dumps(record))


TAMPERING: dict[str, tuple[Callable[[BuildLayout], None], str]] = {
    "reject row lost": (lambda l: _drop_first(l.parts(l.rejects_dir)[0]), "ingest: read = ingested + rejected"),
    "source rows edited": (_edit_source_rows, "ingest: read = ingested + rejected"),
    "row both ingested and rejected": (_duplicate_reject_id, "ingest: every row once"),
    "caption row lost": (lambda l: _drop_first(l.parts(l.captions_dir)[0]), "parse: every ingested row is parsed"),
    "selected row not parsed": (lambda l: _set(l.parts(l.selected_dir)[0], "sample_id", 0, 99_999),
                                "select: selected rows are parsed rows"),
    "download row lost": (lambda l: _drop_first(l.downloads), "download: one row per selected sample"),
    "unknown status": (lambda l: _set(l.downloads, "status", 0, "teleported"), "download: every status is known"),
    "kept row lost": (lambda l: _drop_first(l.kept), "dedup: kept + duplicates = successful downloads"),
    "duplicate of nothing": (lambda l: _set(l.duplicates, "duplicate_of", 0, 99_999),
                             "dedup: a duplicate points at a kept sample"),
    "sample missing from the entity index": (_unindex_first_kept, "index: entity_index covers the kept samples"),
    "partner not kept": (lambda l: _set(l.partners, "partner_id", 0, 99_999), "index: partners are kept samples"),
    "meta row lost": (lambda l: _drop_first(l.parts(l.meta_dir)[0]), "reshard: meta holds the kept samples"),
    "sample lost from a shard": (lambda l: _rewrite_tar(l.shards()[0], lambda name, i: i != 0),
                                 "reshard: shard samples = meta rows"),
    "caption lost from a shard": (lambda l: _rewrite_tar(l.shards()[0], lambda name, i: not name.endswith(".txt")
                                                         or i != 1), "reshard: every sample has jpg, txt and json"),
    "locator row lost": (lambda l: _drop_first(l.locator), "reshard: the locator covers the written samples"),
}


@pytest.fixture()
def finished(tmp_path: Path):
    root = tmp_path / "build"
    fx = write_staged_build(root)
    source = tmp_path / "source.tsv"
    source.write_text("irrelevant\n")
    cfg = BuildConfig(source=str(source), build_dir=str(root), shard=ShardConfig(samples_per_shard=6))
    results = {"ingest": {"source_sha256": "0" * 64}, "reshard": reshard(root, cfg.shard)}
    assert fx["n_rejects"] == 2
    return root, cfg, results


def test_an_untouched_build_satisfies_every_invariant(finished):
    root, cfg, results = finished
    assert check_invariants(root) == []
    assert verify_manifest(write_manifest(root, cfg, results)).ok


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_one_file_breaks_its_invariant_in_manifest_and_verify(finished, case):
    root, cfg, results = finished
    manifest = write_manifest(root, cfg, results)
    tamper, invariant = TAMPERING[case]
    tamper(BuildLayout(root))

    report = verify_manifest(manifest)
    assert not report.ok
    assert any(p.startswith(invariant) for p in report.problems), report.problems
    manifest.unlink()
    with pytest.raises(ManifestCountError) as err:
        write_manifest(root, cfg, results)
    assert invariant in str(err.value)
    assert not manifest.exists()


def test_verify_recounts_every_count_from_the_files(finished):
    root, cfg, results = finished
    manifest = write_manifest(root, cfg, results)
    record = json.loads(manifest.read_text())
    record["counts"]["download"]["errors"] = {"made up": 1}
    record["counts"]["index"]["partner_rows"] += 1
    manifest.write_text(json.dumps(record))
    problems = verify_manifest(manifest).problems
    assert any(p.startswith("count counts.index.partner_rows") for p in problems), problems
    assert any(p.startswith("count counts.download.errors.made up") for p in problems), problems


def test_unknown_status_is_not_counted_as_a_failure(finished):
    root, cfg, results = finished
    _set(BuildLayout(root).downloads, "status", 0, "teleported")
    with pytest.raises(ManifestCountError, match="download: selected = success \\+ failed"):
        write_manifest(root, cfg, results)
    assert pc.sum(pc.equal(pq.read_table(BuildLayout(root).downloads)["status"], "teleported")).as_py() == 1
