"""Webdataset sources: naming shards (folder, glob, brace; local and http), ingest with stable ids and reasons,
extraction of the selected images into the download stage's layout, and whole builds (CLI; same ids as the TSV
route on the embedded sample)."""
from __future__ import annotations

import functools
import io
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.download import DownloadConfig
from curation.ingest import IngestConfig
from curation.staging import iter_staged_images
from curation.tario import write_tar
from curation.verify import VerifyConfig, verify_downloads
from curation.wds_source import (
    POSITIONAL_BASE,
    SHARD_META_KEY,
    SHARD_STRIDE,
    expand_shards,
    extract_selected,
    ingest_wds,
    is_wds_source,
)
from manifests.layout import BuildLayout, part_name


def jpeg(size=(40, 30), colour=(200, 30, 30), exif_orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    if exif_orientation is None:
        image.save(buf, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_tar(path) as tar:
        for key, files in samples:
            for ext, data in files.items():
                tar.add(f"{key}.{ext}", data)
    return path


def crawl(root: Path) -> dict[str, Path]:
    """Two img2dataset-style shards (9-digit keys) with one sample of every kind, and a shard with named keys."""
    meta = lambda key, **kw: json.dumps({"key": key, "url": f"http://x/{key}.jpg", **kw}).encode()
    first = write_shard(root / "00000.tar", [
        ("000000000", {"jpg": jpeg(), "txt": b"a dog on a car", "json": meta("000000000")}),
        ("000000001", {"jpg": jpeg((30, 60), exif_orientation=6), "json": meta("000000001", caption="a cat")}),
        ("000000002", {"txt": b"a dog without its image"}),                        # no image
        ("000000003", {"jpg": jpeg(), "txt": b"  "}),                               # empty caption
        ("000000004", {"jpg": jpeg(), "txt": b"\xff\xfe a dog"}),                   # bad utf-8
        ("000000005", {"jpg": jpeg()[:200], "txt": b"a broken dog photo"}),         # undecodable
        ("000000000", {"jpg": jpeg(), "txt": b"the same key again"}),               # duplicate key
    ])
    second = write_shard(root / "00001.tar", [
        ("000010000", {"png": _png(), "txt": b"a dog in png"}),
        ("000010001", {"jpg": jpeg(colour=(0, 0, 250)), "txt": b"a blue car"}),
    ])
    named = write_shard(root / "named" / "shard-a.tar", [
        ("photos/alpha", {"jpg": jpeg(), "txt": b"a dog"}), ("photos/beta", {"jpg": jpeg(), "txt": b"a cat"})])
    return {"first": first, "second": second, "named": named}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 255, 0, 128)).save(buf, format="PNG")
    return buf.getvalue()


def test_source_kinds_and_shard_names(tmp_path):
    shards = crawl(tmp_path / "crawl")
    folder = tmp_path / "crawl"
    assert is_wds_source(folder) and is_wds_source(f"{folder}/*.tar") and is_wds_source(f"{folder}/{{00000..00001}}.tar")
    assert is_wds_source("https://host/cc12m-{00000..01242}.tar") and is_wds_source(shards["first"])
    assert not is_wds_source(tmp_path / "cc12m.tsv") and not is_wds_source("https://host/cc12m.tsv")
    assert not is_wds_source("")  # not the working directory
    both = [str(shards["first"]), str(shards["second"])]
    assert expand_shards(folder) == both
    assert expand_shards(f"{folder}/*.tar") == both
    assert expand_shards(f"{folder}/{{00001..00000}}.tar") == both[::-1]  # brace order as written
    assert expand_shards("http://127.0.0.1:9/s-{0..2}.tar") == [f"http://127.0.0.1:9/s-{i}.tar" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_shards(f"{folder}/{{00000..00002}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar"):
        expand_shards(tmp_path / "empty")


def _ingest(tmp_path, source) -> tuple[dict, BuildLayout]:
    layout = BuildLayout(tmp_path / "build")
    return ingest_wds(str(source), layout.root, IngestConfig()), layout


def test_ingest_ids_reasons_and_provenance(tmp_path):
    crawl(tmp_path / "crawl")
    result, layout = _ingest(tmp_path, f"{tmp_path}/crawl/{{00000..00001}}.tar")
    assert result["parts"] == [part_name(0), part_name(1)]
    assert (result["read"], result["ingested"], result["rejected"]) == (9, 5, 4)
    assert result["rejects_by_reason"] == {"bad_utf8": 1, "duplicate_key": 1, "empty_caption": 1, "no_image": 1}
    rows = pa.concat_tables(pq.read_table(p) for p in layout.parts(layout.ingest_dir)).to_pylist()
    by_id = {r["sample_id"]: r for r in rows}
    assert sorted(by_id) == [0, 1, 5, 10000, 10001]  # numeric keys are the ids (5 is undecodable: found later)
    assert by_id[1]["caption"] == "a cat" and by_id[1]["url"] == "http://x/000000001.jpg"  # caption from json
    assert by_id[10000]["url"] is None and by_id[10000]["source_key"] == "000010000"
    assert by_id[10001]["source_shard"].endswith("00001.tar")
    rejects = pa.concat_tables(pq.read_table(p) for p in layout.parts(layout.rejects_dir)).to_pylist()
    dup = next(r for r in rejects if r["reason"] == "duplicate_key")
    assert dup["sample_id"] == POSITIONAL_BASE + 6 and "000000000" in dup["raw"]  # its own id, never a clash
    # A rerun returns the recorded result; a different source in the same folder is refused.
    assert ingest_wds(f"{tmp_path}/crawl/{{00000..00001}}.tar", layout.root, IngestConfig()) == result
    with pytest.raises(ValueError, match="different source"):
        ingest_wds(f"{tmp_path}/crawl/00000.tar", layout.root, IngestConfig())


def test_named_keys_get_positional_ids_and_repeated_ids_are_refused(tmp_path):
    shards = crawl(tmp_path / "crawl")
    result, layout = _ingest(tmp_path, shards["named"])
    ids = sorted(pq.read_table(layout.ingest_dir / part_name(0))["sample_id"].to_pylist())
    assert ids == [POSITIONAL_BASE, POSITIONAL_BASE + 1] and result["ingested"] == 2
    with pytest.raises(ValueError, match="more than one sample"):  # the same shard twice under two names
        (tmp_path / "copy").mkdir()
        (tmp_path / "copy" / "00000.tar").write_bytes(shards["first"].read_bytes())
        ingest_wds(f"{{{shards['first']},{tmp_path}/copy/00000.tar}}", tmp_path / "b2", IngestConfig())
    assert SHARD_STRIDE > 10_000


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_source_reads_the_same_rows_as_the_local_one(tmp_path):
    crawl(tmp_path / "crawl")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "crawl"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00001}}.tar"
        _remote, remote_layout = _ingest(tmp_path / "remote", url)
    finally:
        server.shutdown()
        server.server_close()
    local, local_layout = _ingest(tmp_path / "local", f"{tmp_path}/crawl/{{00000..00001}}.tar")
    for part in local["parts"]:
        shard_sha = [json.loads(pq.read_schema(lay.ingest_dir / part).metadata[SHARD_META_KEY])["sha256"]
                     for lay in (remote_layout, local_layout)]
        assert shard_sha[0] == shard_sha[1]  # the same bytes came over http
        a = pq.read_table(remote_layout.ingest_dir / part).drop(["source_shard"])
        b = pq.read_table(local_layout.ingest_dir / part).drop(["source_shard"])
        assert a.equals(b)


def _select_everything(layout: BuildLayout) -> list[int]:
    """Stand-in for parse+select: every ingested row selected (extraction only reads sample_id from selected/)."""
    ids = []
    for part in layout.parts(layout.ingest_dir):
        table = pq.read_table(part, columns=["sample_id"])
        layout.selected_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, layout.selected_dir / part.name)
        ids += table["sample_id"].to_pylist()
    return sorted(ids)


def test_extraction_writes_the_download_layout(tmp_path):
    shards = crawl(tmp_path / "crawl")
    _, layout = _ingest(tmp_path, f"{tmp_path}/crawl/{{00000..00001}}.tar")
    selected = _select_everything(layout)
    cfg = DownloadConfig(image_size=32, resize_mode="keep_ratio_largest")
    counts = extract_selected(layout.root, cfg)
    assert (counts["selected"], counts["success"], counts["failed_to_resize"]) == (5, 4, 1)
    downloads = {r["sample_id"]: r for r in pq.read_table(layout.downloads).to_pylist()}
    assert sorted(downloads) == selected
    assert downloads[5]["status"] == "failed_to_resize" and downloads[5]["error_message"].startswith("undecodable")
    # EXIF orientation 6 (rotate 90°): the 30x60 image is stored upright as 60x30, then fit into 32 px.
    assert (downloads[1]["width"], downloads[1]["height"]) == (32, 16)
    images = dict(iter_staged_images(layout.root))
    assert sorted(images) == [0, 1, 10000, 10001]
    assert Image.open(io.BytesIO(images[10000])).format == "JPEG"  # the PNG is stored as JPEG
    assert verify_downloads(layout.root, VerifyConfig(min_success_rate=0.5))["success"] == 4
    assert extract_selected(layout.root, cfg)["skipped"] is True

    # A source shard rewritten after ingest is an error, not a silent mix.
    write_shard(shards["second"], [("000010000", {"jpg": jpeg(), "txt": b"a dog in png"}),
                                   ("000010001", {"jpg": jpeg(), "txt": b"a blue car"})])
    with pytest.raises(ValueError, match="changed since ingest"):
        extract_selected(layout.root, DownloadConfig(image_size=48))


def test_cli_refuses_missing_shards_with_one_clear_error(tmp_path, capsys):
    from flows.cli import main

    crawl(tmp_path / "crawl")
    assert main(["build", "--source", f"{tmp_path}/crawl/{{00000..00002}}.tar", "--out", str(tmp_path / "b")]) == 2
    assert "1 shard(s) not found" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_build_from_brace_pattern_matches_the_tsv_route(tmp_path):
    """`cc4m build --source 'DIR/{00000..00003}.tar'` with no network, and the same selected and kept ids as the
    TSV route (img2dataset through the sample server) on the rows both have the same images for."""
    from curation.build import run_build
    from curation.config import BuildConfig
    from curation.sample import SampleImageServer, make_sample
    from curation.sample.wds import make_wds_source
    from flows.cli import main

    sample = make_sample(tmp_path / "sample", n_rows=160, image_size=64, eval_images=1, eval_selection_images=0)
    wds = make_wds_source(sample, tmp_path / "wds")
    settings = ["--set", "shard.samples_per_shard=16", "--set", "download.image_size=64"]
    assert main(["build", "--source", wds.pattern, "--out", str(tmp_path / "from-wds"), *settings]) == 0
    with SampleImageServer(sample.root, slow_seconds=3.0) as server:
        cfg = BuildConfig(source=str(sample.source_tsv), build_dir=str(tmp_path / "from-tsv"),
                          download={"image_size": 64, "timeout": 2, "thread_count": 16, "http_proxy": server.proxy_url},
                          shard={"samples_per_shard": 16})
        run_build(cfg)

    def ids(build: str, name: str) -> set[int]:
        layout = BuildLayout(tmp_path / build)
        paths = layout.parts(layout.selected_dir) if name == "selected" else [layout.kept]
        return {i for p in paths for i in pq.read_table(p, columns=["sample_id"])["sample_id"].to_pylist()}

    manifest = json.loads((tmp_path / "from-wds" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["ingest"]["rejected_by_reason"] == {"empty_caption": 1, "no_image": 1}  # rows 23 and the 1st 404
    assert counts["download"]["failed_by_status"]["failed_to_resize"] >= 1  # the corrupt rows
    assert counts["download"]["failed_by_reason"]["undecodable"] >= 1  # ... by failure class
    assert counts["reshard"]["written"] == len(ids("from-wds", "kept")) > 0
    assert manifest["inputs"]["source"] == Path(wds.pattern).name  # the identity: name + sha256 of the shards
    assert json.loads((tmp_path / "from-wds" / "run.json").read_text())["source"] == wds.pattern  # where, this run
    same_images = wds.ids_with_image
    assert ids("from-wds", "selected") == ids("from-tsv", "selected") & same_images
    assert ids("from-wds", "kept") == ids("from-tsv", "kept") & same_images


def test_parallel_ingest_and_extraction_give_the_same_rows(tmp_path):
    crawl(tmp_path / "crawl")
    tables = []
    for processes in (1, 2):
        layout = BuildLayout(tmp_path / f"p{processes}")
        ingest_wds(f"{tmp_path}/crawl/{{00000..00001}}.tar", layout.root, IngestConfig(), processes=processes)
        _select_everything(layout)
        tables.append(pa.concat_tables(pq.read_table(p).replace_schema_metadata(None)
                                       for p in layout.parts(layout.ingest_dir)).to_pylist())
        extract_selected(layout.root, DownloadConfig(image_size=32, processes_count=processes))
        downloads = pq.read_table(layout.downloads).replace_schema_metadata(None)
        tables.append(downloads.drop_columns(["first_attempt_at", "last_attempt_at"]).to_pylist())  # run times
        assert sorted(p.name for p in layout.staging_dir.glob("*_stats.json")) == ["00000_stats.json",
                                                                                  "00001_stats.json"]
    assert tables[0] == tables[2] and tables[1] == tables[3]  # ingest rows, downloads rows
