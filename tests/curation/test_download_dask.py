"""Downloads on Dask: a round's parts (whole staging shards, each a guarded img2dataset run) on a LocalCluster of 2
worker processes. Each worker runs parts, the build is byte-identical to the threads build, and a worker killed
mid-download has its part redone with the same result."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from build_fixtures import ImageServer, make_jpeg

from curation.build import run_build
from curation.config import BuildConfig
from curation.download import DownloadConfig
from curation.download_parts import PARTS_DIR, DaskParts, dask_parts
from curation.staging import iter_staged_images
from manifests.layout import BuildLayout

N = 24
WORDS = ("dog", "cat", "car", "horse", "bird", "boat")


def _source(tmp_path: Path) -> Path:
    path = tmp_path / "source.tsv"
    path.write_text("".join(f"http://cc4m-sample.invalid/img/{i}.jpg\ta {WORDS[i % len(WORDS)]} on a road, photo {i}\n"
                            for i in range(N)))
    return path


def _routes() -> dict:
    return {f"/img/{i}.jpg": (200, make_jpeg(i, (48 + i % 5, 40)), "image/jpeg") for i in range(N)}


def _config(source: Path, out: Path, proxy: str) -> BuildConfig:
    return BuildConfig.from_dict({
        "source": str(source), "build_dir": str(out),
        "download": {"image_size": 32, "thread_count": 2, "timeout": 5, "number_sample_per_shard": 3,
                     "shards_per_part": 2, "http_proxy": proxy, "progress_interval_s": 0.5},
        "shard": {"samples_per_shard": 8},
    })


def _snapshot(build: Path) -> dict[str, bytes]:
    layout = BuildLayout(build)
    files = [*layout.shards(), *layout.parts(layout.meta_dir), layout.locator, layout.partners, layout.entity_index,
             layout.cooccurrence, layout.kept, layout.duplicates, layout.manifest]
    return {p.relative_to(build).as_posix(): p.read_bytes() for p in files if p.exists()}


def _dask_build(source: Path, out: Path, server: ImageServer, runner: DaskParts) -> dict:
    results: dict = {}
    run_build(_config(source, out, server.base_url), results=results, parts=runner)
    return results["download"]


@pytest.mark.slow
def test_download_parts_on_two_dask_workers(tmp_path):
    source = _source(tmp_path)
    with ImageServer(_routes(), delay_s=0.15) as server:
        threads = tmp_path / "threads"
        run_build(_config(source, threads, server.base_url))
        reference = _snapshot(threads)
        assert any(k.startswith("shards/") for k in reference)
        with dask_parts(None, n_workers=2) as runner:
            pids = set(runner.client.run(os.getpid).values())
            result = _dask_build(source, tmp_path / "dask", server, runner)
            killed = _dask_build_with_a_kill(source, tmp_path / "killed", server, runner)

    # Every part ran on a worker of the cluster, and each of the 2 workers ran at least one.
    workers = result["download_workers"]
    assert sorted(w["part"] for w in workers) == [f"first/{a:05d}-{a + 1:05d}" for a in range(0, 8, 2)]
    assert {w["pid"] for w in workers} == pids and all(w["host"] for w in workers)
    run_record = (tmp_path / "dask" / "run.json").read_text()
    assert json.loads(run_record)["download_workers"] == workers
    assert _snapshot(tmp_path / "dask") == reference  # byte-identical to the threads build
    assert list(iter_staged_images(tmp_path / "dask")) == list(iter_staged_images(threads))
    for build in ("dask", "killed"):
        assert not (tmp_path / build / "staging" / PARTS_DIR).exists()

    # The killed worker's part was redone by a live worker, and the build is still identical.
    part, pid = killed["killed"]
    redone = next(w for w in killed["result"]["download_workers"] if w["part"] == part)
    assert redone["pid"] != pid
    assert _snapshot(tmp_path / "killed") == reference
    downloads = pq.read_table(BuildLayout(tmp_path / "killed").downloads).to_pylist()
    assert sum(r["status"] == "success" for r in downloads) == N


def _dask_build_with_a_kill(source: Path, out: Path, server: ImageServer, runner: DaskParts) -> dict:
    """As _dask_build, with SIGKILL to a worker while its part's img2dataset is downloading."""
    client = runner.client
    killed: list[tuple[str, int]] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            started = {p.name for p in (out / "staging" / PARTS_DIR).glob("*") if (p / "img2dataset.log").exists()}
            if started:
                pids = client.run(os.getpid)
                for address, keys in client.processing().items():
                    for key in keys:
                        folder = key.split("/")[-1].rsplit("-", 1)[0] if isinstance(key, str) else None
                        if folder in started and address in pids:
                            killed.append((f"first/{folder}", pids[address]))
                            os.kill(pids[address], signal.SIGKILL)
                            return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    result = _dask_build(source, out, server, runner)
    killer.join(timeout=5)
    assert killed, "no worker was caught mid-download"
    return {"result": result, "killed": killed[0]}


def test_cluster_distributors_are_refused_naming_the_dask_path():
    for name in ("pyspark", "ray"):
        with pytest.raises(ValueError) as err:
            DownloadConfig(distributor=name)
        message = str(err.value)
        assert "\n" not in message and f"distributor {name!r} is not supported" in message
        assert "task_runner='dask'" in message
    with pytest.raises(ValueError, match="task_runner='dask'"):
        BuildConfig.from_dict({"source": "x.tsv", "build_dir": "b", "download": {"distributor": "ray"}})
