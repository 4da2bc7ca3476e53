from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from build_fixtures import write_staged_build

from curation.reshard import ShardConfig, reshard, sample_key
from curation.shard_order import mix_ids
from manifests.layout import BuildLayout


def _tree_bytes(root):
    layout = BuildLayout(root)
    files = [*layout.shards(), *layout.parts(layout.meta_dir), layout.locator]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def test_shards_match_meta_and_locator(tmp_path):
    fx = write_staged_build(tmp_path)
    result = reshard(tmp_path, ShardConfig(samples_per_shard=8))
    kept = fx["kept"]
    assert len(kept) == 20  # 26 rows - 4 without class - 1 failed - 1 duplicate
    assert result["written"] == 20 and result["shards"] == 3 and result["shards_written"] == 3
    layout = BuildLayout(tmp_path)
    assert [p.name for p in layout.shards()] == ["cc4m-000000.tar", "cc4m-000001.tar", "cc4m-000002.tar"]

    meta = pq.read_table(layout.meta_dir).sort_by([("shard", "ascending"), ("position", "ascending")]).to_pylist()
    assert sorted(m["sample_id"] for m in meta) == kept
    # one growth round: a seeded permutation of the ids (curation.shard_order), not the source-row order
    in_layout = [kept[i] for i in np.lexsort((np.array(kept), mix_ids(np.array(kept))))]
    assert in_layout != kept
    partners = {}
    for p in fx["partners"]:
        entry = {"partner_id": p["partner_id"], "shared_class": p["shared_class"]}
        partners.setdefault(p["sample_id"], []).append(entry)
    seen = []
    for shard in layout.shards():
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
            keys = [m.name for m in members]
            n = len(keys) // 3
            assert n <= 8
            for pos in range(n):
                jpg, txt, js = members[3 * pos: 3 * pos + 3]
                sid = int(jpg.name.split(".")[0])
                assert [jpg.name, txt.name, js.name] == [f"{sample_key(sid)}.{e}" for e in ("jpg", "txt", "json")]
                assert len(sample_key(sid)) == 12
                assert tar.extractfile(jpg).read() == fx["images"][sid]
                assert tar.extractfile(txt).read().decode() == fx["rows"][sid]["caption"]
                doc = json.loads(tar.extractfile(js).read())
                assert doc["sample_id"] == sid and doc["entities"] == fx["rows"][sid]["entities"]
                assert doc["entity_words"] == fx["rows"][sid]["entity_words"]
                assert doc["partners"] == partners.get(sid, []) and (doc["width"], doc["height"]) == (40, 30)
                m = meta[len(seen)]
                assert (m["sample_id"], m["shard"], m["position"]) == (sid, shard.name, pos)
                seen.append(sid)
    assert seen == in_layout  # layout order across shards

    locator = pq.read_table(layout.locator).to_pylist()
    assert [r["sample_id"] for r in locator] == in_layout
    for r in locator:  # O(1) fetch: seek + read gives exactly the JPEG
        with open(layout.shards_dir / r["shard"], "rb") as fh:
            fh.seek(r["offset"])
            assert fh.read(r["size"]) == fx["images"][r["sample_id"]]


def test_deterministic_and_resumable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_staged_build(a)
    write_staged_build(b)
    reshard(a, ShardConfig(samples_per_shard=8))
    reshard(b, ShardConfig(samples_per_shard=8))
    first = _tree_bytes(a)
    assert first == _tree_bytes(b)

    # Rerun: nothing to do, nothing rewritten.
    layout = BuildLayout(a)
    mtimes = {p: p.stat().st_mtime_ns for p in layout.shards()}
    again = reshard(a, ShardConfig(samples_per_shard=8))
    assert again["skipped"] and again["shards_written"] == 0
    assert {p: p.stat().st_mtime_ns for p in layout.shards()} == mtimes

    # Interrupted: a shard lost, another one half-written (truncated), locator gone -> only those redone.
    (layout.shards_dir / "cc4m-000001.tar").unlink()
    with open(layout.shards_dir / "cc4m-000002.tar", "r+b") as fh:
        fh.truncate(1000)
    layout.locator.unlink()
    resumed = reshard(a, ShardConfig(samples_per_shard=8))
    assert resumed["shards_written"] == 2 and resumed["shards_skipped"] == 1
    assert _tree_bytes(a) == first
    assert not list(layout.shards_dir.glob(".*"))  # no temporary files left


def test_shard_size_change_removes_stale_shards(tmp_path):
    write_staged_build(tmp_path)
    reshard(tmp_path, ShardConfig(samples_per_shard=4))
    assert len(BuildLayout(tmp_path).shards()) == 5
    result = reshard(tmp_path, ShardConfig(samples_per_shard=7))
    layout = BuildLayout(tmp_path)
    assert result["shards"] == 3 and len(layout.shards()) == 3 and len(layout.parts(layout.meta_dir)) == 3
    assert pq.read_table(layout.meta_dir).num_rows == 20


def test_bad_inputs_raise(tmp_path):
    fx = write_staged_build(tmp_path)
    layout = BuildLayout(tmp_path)
    # A corrupted staged image is caught by its sha256, not written.
    staging_tar = layout.staging_dir / "00000.tar"
    with tarfile.open(staging_tar) as tar:
        first_jpg = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(staging_tar.read_bytes())
    data[first_jpg.offset_data + 200] ^= 0xFF
    staging_tar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        reshard(tmp_path, ShardConfig(samples_per_shard=8))
    assert not layout.shards()
    shutil.rmtree(tmp_path)
    fx = write_staged_build(tmp_path, fail_idx=(), dup_idx=())
    import pyarrow as pa
    pq.write_table(pa.table({"sample_id": pa.array([fx["selected"][3], fx["selected"][1]], pa.int64())}), layout.kept)
    with pytest.raises(ValueError, match="ascending"):
        reshard(tmp_path, ShardConfig())
    with pytest.raises(ValueError, match="positive"):
        ShardConfig(samples_per_shard=0)


def test_bad_partner_rows_raise(tmp_path):
    fx = write_staged_build(tmp_path)
    import pyarrow as pa

    sid = fx["kept"][1]
    pq.write_table(pa.table({"sample_id": pa.array([sid], pa.int64()), "rank": pa.array([0], pa.int32()),
                             "partner_id": pa.array([sid], pa.int64()), "shared_class": ["dog"]}),
                   BuildLayout(tmp_path).partners)
    with pytest.raises(ValueError, match="bad partner rows"):
        reshard(tmp_path, ShardConfig())


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    fx = write_staged_build(tmp_path)
    reshard(tmp_path, ShardConfig(samples_per_shard=8))
    urls = [str(p) for p in BuildLayout(tmp_path).shards()]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == [sample_key(sid) for sid in fx["kept"]]
    for sample in samples:
        sid = json.loads(sample["json"])["sample_id"]
        assert sample["__key__"] == sample_key(sid) and sample["jpg"] == fx["images"][sid]
