from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from build_fixtures import ImageServer, caption_rows, make_jpeg, write_part

from curation.download import DownloadConfig, download_selected
from curation.staging import iter_staged_images
from manifests.layout import BuildLayout, part_name


def _routes(ids, bad_404=(), not_image=()):
    routes = {}
    for sid in ids:
        if sid in bad_404:
            continue
        if sid in not_image:
            routes[f"/img/{sid}.jpg"] = (200, b"<html>definitely not an image</html>", "text/html")
        else:
            routes[f"/img/{sid}.jpg"] = (200, make_jpeg(sid), "image/jpeg")
    return routes


def test_config_validation():
    with pytest.raises(ValueError, match="resize_mode"):
        DownloadConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="may not set"):
        DownloadConfig(extra_img2dataset_args={"output_folder": "/tmp/x"})
    with pytest.raises(ValueError, match="thread_count"):
        DownloadConfig(thread_count=0)
    cfg = DownloadConfig(extra_img2dataset_args={"min_image_size": 8})
    assert cfg.to_dict()["extra_img2dataset_args"] == {"min_image_size": 8}
    with pytest.raises(TypeError):
        cfg.extra_img2dataset_args["x"] = 1  # frozen mapping
    assert hash(cfg) == hash(DownloadConfig(extra_img2dataset_args={"min_image_size": 8}))


@pytest.mark.slow
def test_download_one_row_per_selected_sample(tmp_path):
    ids = [3, 5, 8, 13, 21, 34, 55]
    with ImageServer(_routes(ids, bad_404={8}, not_image={21})) as server:
        # Two selected parts, written out of order on purpose: the stage sorts by sample_id.
        layout = BuildLayout(tmp_path)
        rows = caption_rows(ids, "http://cc4m-sample.invalid")
        write_part(layout.selected_dir / part_name(1), rows[4:])
        write_part(layout.selected_dir / part_name(0), rows[:4])
        cfg = DownloadConfig(image_size=32, thread_count=4, number_sample_per_shard=3, timeout=5,
                             http_proxy=server.base_url)
        result = download_selected(tmp_path, cfg)

    assert result["skipped"] is False
    assert result["selected"] == 7 and result["success"] == 5
    assert result["failed_to_download"] == 1 and result["failed_to_resize"] == 1 and result["missing"] == 0
    table = pq.read_table(layout.downloads).to_pylist()
    assert [r["sample_id"] for r in table] == ids
    status = {r["sample_id"]: r["status"] for r in table}
    assert status[8] == "failed_to_download" and status[21] == "failed_to_resize"
    reason = {r["sample_id"]: (r["reason"], r["transient"]) for r in table}
    assert reason[8] == ("http_404", False) and reason[21] == ("undecodable", False)
    assert result["failed_by_reason"] == {"http_404": 1, "undecodable": 1} and result["failed"] == 2
    assert all(status[s] == "success" for s in ids if s not in (8, 21))
    for r in table:
        assert (r["error_message"] is None) == (r["status"] == "success")
        if r["status"] == "success":
            assert r["width"] == 32 and r["height"] == 32 and len(r["sha256"]) == 64
    assert len(result["staging_shards"]) == 3  # 7 urls at 3 per staging shard

    staged = list(iter_staged_images(tmp_path))
    assert [sid for sid, _ in staged] == [3, 5, 13, 34, 55]
    assert all(data[:2] == b"\xff\xd8" for _, data in staged)
    assert [sid for sid, _ in iter_staged_images(tmp_path, sample_ids=[34, 5])] == [5, 34]

    # Rerun: the recorded input matches, nothing is done (the server is gone, so any download would fail).
    mtime = layout.downloads.stat().st_mtime_ns
    again = download_selected(tmp_path, cfg)
    assert again["skipped"] is True and again["success"] == 5
    assert layout.downloads.stat().st_mtime_ns == mtime

    # A staging shard that never finished shows up as "missing", never silently lost; a rerun without the server
    # resumes only that shard (the others are done) and records its failures.
    layout.downloads.unlink()
    for name in ("00002_stats.json", "00002.parquet", "00002.tar"):
        (layout.staging_dir / name).unlink()
    resumed = download_selected(tmp_path, DownloadConfig(image_size=32, thread_count=4, number_sample_per_shard=3,
                                                         timeout=2, http_proxy="http://127.0.0.1:9"))
    assert resumed["selected"] == 7 and resumed["success"] == 4 and resumed["failed_to_download"] == 2
    # the proxy is gone: sample 55 (the redone shard) failed on the build's own proxy (transient, and retried by
    # every rerun); the others are as before
    assert resumed["failed_by_reason"] == {"proxy_unreachable": 1, "http_404": 1, "undecodable": 1}
    assert resumed["transient"] == 1


def test_missing_rows_are_reported(tmp_path, monkeypatch):
    """A staging run that reports nothing (e.g. every shard failed its retries) gives 'missing' rows, not an empty
    table."""
    from curation import download_rounds

    layout = BuildLayout(tmp_path)
    write_part(layout.selected_dir / part_name(0), caption_rows([1, 2, 3], "http://cc4m-sample.invalid"))
    calls = []
    monkeypatch.setattr(download_rounds, "run_img2dataset", lambda *a, **k: calls.append(1))
    result = download_selected(tmp_path, DownloadConfig())
    assert result["missing"] == 3 and result["success"] == 0
    rows = pq.read_table(layout.downloads).to_pylist()
    assert [r["status"] for r in rows] == ["missing"] * 3 and all(r["error_message"] for r in rows)
    # Missing rows are not final: a rerun asks img2dataset again for the unfinished shards.
    again = download_selected(tmp_path, DownloadConfig())
    assert again["skipped"] is False and len(calls) == 2


@pytest.mark.slow
def test_rows_lost_to_the_builds_own_dead_proxy_are_fetched_again_by_a_rerun(tmp_path):
    """A build killed mid-download takes its in-process proxy with it; rows fetched after that fail with
    proxy_unreachable in shards that are finished. A rerun fetches them again, without retry_transient."""
    import socket

    ids = [2, 4, 6, 8]
    layout = BuildLayout(tmp_path)
    write_part(layout.selected_dir / part_name(0), caption_rows(ids, "http://cc4m-sample.invalid"))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connections are refused
    cfg = DownloadConfig(image_size=32, thread_count=4, number_sample_per_shard=2, timeout=5, http_proxy=dead_proxy)
    first = download_selected(tmp_path, cfg)
    closed.close()
    assert first["success"] == 0 and first["failed_by_reason"] == {"proxy_unreachable": 4}
    table = pq.read_table(layout.downloads).to_pylist()
    assert {(r["reason"], r["transient"]) for r in table} == {("proxy_unreachable", True)}
    assert {r["attempts"] for r in table} == {2}  # the run tried once more by itself, the proxy still dead

    with ImageServer(_routes(ids)) as server:
        again = download_selected(tmp_path, DownloadConfig(**{**cfg.to_dict(), "http_proxy": server.base_url}))
    assert again["success"] == 4 and again["skipped"] is False
    assert not DownloadConfig().retry_transient  # the default: only the build's own failures are retried
