from __future__ import annotations

import json

import pytest

from curation.build import BuildConfigMismatch, build_stage_plan, prepare_build_dir, run_build
from curation.config import BuildConfig
from curation.download import DownloadConfig
from curation.manifest import content_config, verify_manifest
from curation.reshard import ShardConfig
from curation.verify import VerifyConfig
from manifests.layout import BuildLayout
from manifests.schema import count_problems


def _cfg(source, build_dir, **download) -> BuildConfig:
    return BuildConfig(
        source=str(source), build_dir=str(build_dir),
        download=DownloadConfig(image_size=64, thread_count=16, timeout=2, number_sample_per_shard=50, **download),
        verify=VerifyConfig(min_success_rate=0.5), shard=ShardConfig(samples_per_shard=16),
    )


def test_config_round_trip_and_validation(tmp_path):
    source = tmp_path / "src.tsv"
    cfg = BuildConfig(source=str(source), build_dir=str(tmp_path / "b"), download={"image_size": 64},
                      dedup={"near": False})
    assert cfg.download.image_size == 64 and cfg.dedup.near is False
    d = json.loads(json.dumps(cfg.to_dict()))
    assert BuildConfig.from_dict(d) == cfg
    cfg.save(tmp_path / "c.json")
    assert BuildConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown settings"):
        BuildConfig.from_dict({**d, "download": {**d["download"], "imagesize": 3}})
    with pytest.raises(ValueError, match="image_size"):
        BuildConfig(source="a", build_dir="b", download={"image_size": -1})
    with pytest.raises(ValueError, match="must differ"):
        BuildConfig(source=str(tmp_path), build_dir=str(tmp_path))
    assert [s.name for s in build_stage_plan()] == ["ingest", "parse", "select", "download", "verify", "dedup",
                                                    "index", "reshard", "manifest", "report"]


def test_config_change_is_refused_unless_allowed(tmp_path):
    source = tmp_path / "src.tsv"
    cfg = _cfg(source, tmp_path / "b")
    layout = prepare_build_dir(cfg)
    assert BuildConfig.load(layout.config) == cfg
    # Runtime-only settings (proxy, threads) may change between runs of one build.
    prepare_build_dir(_cfg(source, tmp_path / "b", http_proxy="http://127.0.0.1:1"))
    other = BuildConfig.from_dict({**cfg.to_dict(), "shard": {"samples_per_shard": 7}})
    with pytest.raises(BuildConfigMismatch, match="shard"):
        prepare_build_dir(other)
    layout.shards_dir.mkdir()
    layout.kept.write_bytes(b"x")  # an earlier stage's output survives; reshard's outputs go
    prepare_build_dir(other, allow_config_change=True)
    assert not layout.shards_dir.exists() and layout.kept.exists()
    assert BuildConfig.load(layout.config).shard.samples_per_shard == 7


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _snapshot(root) -> dict[str, bytes]:
    layout = BuildLayout(root)
    files = [*layout.shards(), *layout.parts(layout.meta_dir), layout.locator, layout.partners, layout.entity_index,
             layout.cooccurrence, layout.kept, layout.duplicates, layout.downloads, *layout.parts(layout.selected_dir)]
    snap = {p.relative_to(root).as_posix(): p.read_bytes() for p in files}
    snap["manifest"] = layout.manifest.read_bytes()  # no time, path or port in it: byte-identical across runs
    return snap


@pytest.mark.slow
def test_run_build_end_to_end_rerun_and_resume(tmp_path, monkeypatch):
    from curation.sample import SampleImageServer, make_sample

    sample = make_sample(tmp_path / "sample", n_rows=150, image_size=64, eval_images=1, eval_selection_images=0)
    build_dir = tmp_path / "build"
    with SampleImageServer(sample.root, slow_seconds=3.0) as server:
        cfg = _cfg(sample.source_tsv, build_dir, http_proxy=server.proxy_url)
        results: dict = {}
        manifest_path = run_build(cfg, results=results)

        manifest = json.loads(manifest_path.read_text())
        c = manifest["counts"]
        assert count_problems(c, manifest["shards"]) == []
        assert c["ingest"]["read"] == 150 and c["ingest"]["rejected"] >= 1
        assert c["select"]["selected"] == (c["reshard"]["written"] + c["download"]["failed"]
                                           + c["dedup"]["removed_duplicate"])
        assert c["download"]["failed"] >= 1 and c["reshard"]["written"] > 0  # the sample fails some URLs on purpose
        assert manifest["spacy_model"]["name"] != "unknown" and manifest["config"] == content_config(cfg)
        report = verify_manifest(manifest_path)
        assert report.ok, report.problems
        assert report.samples_checked == c["reshard"]["written"]
        first = _snapshot(build_dir)

        # Rerun of a finished build: every stage skips, no output is rewritten.
        layout = BuildLayout(build_dir)
        watched = [*layout.shards(), layout.locator, layout.manifest, layout.downloads, layout.kept, layout.partners]
        mtimes = {p: p.stat().st_mtime_ns for p in watched}
        again: dict = {}
        assert run_build(cfg, results=again) == manifest_path
        assert all(r["skipped"] for r in again["parse"] + again["select"])
        assert all(again[s]["skipped"] for s in ("download", "dedup", "index", "reshard"))
        assert {p: p.stat().st_mtime_ns for p in watched} == mtimes

        # Interrupted run: two shards and later-stage outputs lost, then a crash while rewriting the second of them.
        assert len(layout.shards()) >= 3
        (layout.shards_dir / "cc4m-000001.tar").unlink()
        (layout.shards_dir / "cc4m-000002.tar").unlink()
        layout.locator.unlink()
        layout.partners.unlink()
        layout.manifest.unlink()
        import curation.reshard as reshard_module

        real_write = reshard_module._write_shard
        calls = []

        def crashing_write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated crash")
            return real_write(*args, **kwargs)

        monkeypatch.setattr(reshard_module, "_write_shard", crashing_write)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_build(cfg)
        assert not list(layout.shards_dir.glob(".*")) and not layout.manifest.exists()  # nothing half-written
        # one of the two was written before the crash (which one depends on the layout order), the other was not
        assert sorted(p.name for p in layout.shards()).count("cc4m-000001.tar") + \
            sorted(p.name for p in layout.shards()).count("cc4m-000002.tar") == 1
        monkeypatch.setattr(reshard_module, "_write_shard", real_write)
        resumed: dict = {}
        run_build(cfg, results=resumed)
        assert resumed["download"]["skipped"] and resumed["dedup"]["skipped"]
        assert resumed["reshard"]["shards_written"] == 1  # only the shard the crash interrupted
        assert _snapshot(build_dir) == first
        assert verify_manifest(manifest_path).ok


@pytest.mark.slow
def test_same_inputs_give_the_same_manifest_and_a_copied_build_reruns_without_work(tmp_path):
    """Two builds of one source in two folders, through two proxies on different ports, give byte-identical
    manifests (same sha256, so the same registry lineage); a `cp -r` of a finished build reruns with every stage
    skipped and nothing rewritten."""
    import shutil

    from curation.sample import SampleImageServer, make_sample
    from manifests.fileio import sha256_file

    sample = make_sample(tmp_path / "sample", n_rows=60, image_size=64, eval_images=1, eval_selection_images=0)
    manifests = []
    for name in ("first", "second"):
        with SampleImageServer(sample.root, slow_seconds=0.5) as server:
            cfg = _cfg(sample.source_tsv, tmp_path / name, http_proxy=server.proxy_url, processes_count=1)
            manifests.append(run_build(cfg))
    assert sha256_file(manifests[0]) == sha256_file(manifests[1])
    assert json.loads(BuildLayout(tmp_path / "first").run_record.read_text())["config"]["download"]["http_proxy"]
    assert "http_proxy" not in json.loads(manifests[0].read_text())["config"]["download"]

    copy = tmp_path / "copied"
    shutil.copytree(tmp_path / "first", copy)  # new mtimes, new inode numbers, new folder
    layout = BuildLayout(copy)
    watched = [*layout.shards(), *layout.parts(layout.meta_dir), layout.locator, layout.kept, layout.manifest]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}
    results: dict = {}
    with SampleImageServer(sample.root, slow_seconds=0.5) as server:
        run_build(_cfg(sample.source_tsv, copy, http_proxy=server.proxy_url), results=results)
    assert all(r["skipped"] for r in results["parse"] + results["select"])
    assert all(results[s]["skipped"] for s in ("download", "dedup", "index", "reshard"))
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before


@pytest.mark.slow
def test_a_grown_source_rebuilds_only_its_new_rows_and_equals_a_fresh_build(tmp_path):
    """CC12M-style growth: rows appended to the source. The rebuild into the same folder downloads only the new
    selected rows, leaves the old downloads alone, and ends byte-identical (shards, meta, index) to a from-scratch
    build of the grown source. Then an edited row is rebuilt where it changed, never served stale."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from curation.sample import SampleImageServer, make_sample
    from curation.staging import URLS_NAME

    sample = make_sample(tmp_path / "sample", n_rows=120, image_size=64, eval_images=1, eval_selection_images=0)
    lines = sample.source_tsv.read_bytes().splitlines(keepends=True)
    source = tmp_path / "cc12m.tsv"
    source.write_bytes(b"".join(lines[:80]))
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    with SampleImageServer(sample.root, slow_seconds=0.5) as server:
        run_build(_cfg(source, grown, http_proxy=server.proxy_url))
        layout = BuildLayout(grown)
        first_round = pq.read_table(layout.staging_dir / URLS_NAME)
        first_written = [r["sample_id"] for m in layout.parts(layout.meta_dir) for r in pq.read_table(m).to_pylist()]
        before = {p.name: p.read_bytes() for p in layout.shards()}
        assert max(first_round["sample_id"].to_pylist()) < 80

        source.write_bytes(b"".join(lines))  # 40 rows appended
        results: dict = {}
        run_build(_cfg(source, grown, http_proxy=server.proxy_url), results=results)
        assert results["ingest"]["changes"]["kind"] == "appended"
        assert results["ingest"]["changes"]["rows_added"] == 40
        rounds = sorted(layout.staging_dir.glob("retry-*/" + URLS_NAME))
        assert len(rounds) == 1, rounds
        asked = pq.read_table(rounds[0])["sample_id"].to_pylist()
        selected = pq.read_table(layout.downloads, columns=["sample_id"])["sample_id"].to_pylist()
        assert asked == [s for s in selected if s >= 80]  # exactly the new selected rows, nothing old again
        assert pq.read_table(layout.staging_dir / URLS_NAME).equals(first_round)  # the first round is kept
        downloads = pq.read_table(layout.downloads, columns=["sample_id", "status"]).to_pylist()
        new_images = sum(1 for r in downloads if r["status"] == "success" and r["sample_id"] >= 80)
        # Every image was hashed where it was encoded, once: the new round's workers hashed only the new images, and
        # dedup decoded none (no image is read again after its download).
        assert results["dedup"]["images_hashed"] == 0 < new_images
        assert results["dedup"]["hashes_from_download"] == results["dedup"]["checked"]
        new_round = pq.read_table(next(layout.staging_dir.glob("retry-*/00000.parquet")))
        assert sorted(new_round.filter(pc.is_valid(new_round["stored_sha256"]))["sample_id"].to_pylist()) == \
            [r["sample_id"] for r in downloads if r["status"] == "success" and r["sample_id"] >= 80]

        run_build(_cfg(source, fresh, http_proxy=server.proxy_url))
    # The grown-source property: every full shard of the first build keeps its samples at their positions, with the
    # same image and caption bytes; what changes there is only what the id-ordered layout changed too: the partner
    # lists in .json, when new samples became partners of old ones. The partial last shard is filled up.
    after = {p.name: p.read_bytes() for p in layout.shards()}
    old_full = sorted(before)[:-1]
    rewritten = [name for name in old_full if after[name] != before[name]]
    for name in old_full:
        old_members, new_members = _members(before[name]), _members(after[name])
        assert list(old_members) == list(new_members), name
        for member, data in old_members.items():
            if data != new_members[member]:
                assert member.endswith(".json"), member
                old_doc, new_doc = json.loads(data), json.loads(new_members[member])
                assert {**old_doc, "partners": None} == {**new_doc, "partners": None}
    assert results["reshard"]["shards_written"] == len(after) - len(old_full) + len(rewritten)
    # The grown build holds the same samples, byte for byte, as a fresh build of the grown source; the layout differs
    # (the new rows are their own growth round, curation.shard_order), and so do the shard files.
    def samples_of(root):
        rows = [r for m in BuildLayout(root).parts(BuildLayout(root).meta_dir) for r in pq.read_table(m).to_pylist()]
        return sorted(({k: v for k, v in r.items() if k not in ("shard", "position")} for r in rows),
                      key=lambda r: r["sample_id"])

    assert samples_of(grown) == samples_of(fresh)
    snap_grown, snap_fresh = _snapshot(grown), _snapshot(fresh)
    for name in ("index/partners.parquet", "index/entity_index.parquet"):
        assert snap_grown[name] == snap_fresh[name], name
    changes = json.loads(layout.manifest.read_text())["changes"]
    assert changes["source"]["kind"] == "appended" and changes["source"]["rows_added"] == 40
    assert changes["samples_removed"] == 0
    assert changes["samples_added"] == results["reshard"]["written"] - len(first_written) > 0
    assert json.loads((fresh / "manifest.json").read_text())["changes"]["previous_manifest_sha256"] is None

    # An edited row (same sample id, new caption and new url) is rebuilt where it changed: its new caption is in the
    # shards and only its new url is fetched.
    meta = pq.read_table(layout.meta_dir / "part-00000.parquet").to_pylist()
    victim = meta[1]
    old_line = lines[victim["sample_id"]]
    url, _ = old_line.rstrip(b"\n").split(b"\t", 1)
    lines[victim["sample_id"]] = url + b"?v=2\ta dog and a cat on a red sofa\n"
    source.write_bytes(b"".join(lines))
    with SampleImageServer(sample.root, slow_seconds=0.5) as server:
        edited: dict = {}
        run_build(_cfg(source, grown, http_proxy=server.proxy_url), results=edited)
    assert edited["ingest"]["changes"]["kind"] == "changed"
    newest = max(layout.staging_dir.glob("retry-*/" + URLS_NAME))
    assert pq.read_table(newest, columns=["sample_id"])["sample_id"].to_pylist() == [victim["sample_id"]]
    rows = {r["sample_id"]: r for m in layout.parts(layout.meta_dir) for r in pq.read_table(m).to_pylist()}
    assert rows[victim["sample_id"]]["caption"] == "a dog and a cat on a red sofa"
    assert verify_manifest(layout.manifest).ok
    changes = json.loads(layout.manifest.read_text())["changes"]
    assert changes["source"]["kind"] == "changed" and changes["source"]["parts_rewritten"] == ["part-00000.parquet"]
