"""A download round split into parts that run anywhere: each part is a run of whole staging shards, downloaded by
one guarded img2dataset (`curation.download_driver`: the same address guard, caps and failure classes) into a part
folder, and its finished shards are then moved into the round folder under the names a single img2dataset run
would have given them (img2dataset's reader starts at the part's first shard id, so shard files and sample keys are
the same). The staging layout, and everything built from it, does not depend on how the round was split.

With the build flow's `task_runner: dask`, the parts run on the Dask workers (`dask_parts`): a cluster of N
machines downloads N parts at once (the build folder must be on a file system they all share). A worker that dies
mid-part has its part redone by another worker: the redo resumes from the part folder's finished shards
(img2dataset's incremental mode) and redoes the unfinished ones.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.download_config import DownloadConfig
from curation.download_driver import driver_payload, run_img2dataset
from curation.io import read_parquet, write_parquet_atomic
from curation.staging import URLS_NAME, staging_shards

log = logging.getLogger(__name__)

PARTS_DIR = "_parts"
SHARD_SUFFIXES = (".tar", ".parquet", "_stats.json")  # moved in this order: the stats file says "finished"


@dataclass(frozen=True)
class DownloadPart:
    """Shards [first_shard, end_shard) of the round in `round_folder`; `cfg` is DownloadConfig.to_dict()."""

    round_folder: str
    first_shard: int
    end_shard: int
    cfg: dict[str, Any]

    @property
    def name(self) -> str:
        round_name = Path(self.round_folder).name if Path(self.round_folder).name.startswith("retry-") else "first"
        return f"{round_name}/{self.first_shard:05d}-{self.end_shard - 1:05d}"


PartRunner = Callable[[list[DownloadPart]], list[dict[str, Any]]]


def plan_parts(folder: Path, rows: int, cfg: Any) -> list[DownloadPart]:
    """The parts of a round that still have unfinished shards."""
    shards = -(-rows // cfg.number_sample_per_shard)
    done = {int(s) for s in staging_shards(folder)}
    step = cfg.shards_per_part
    parts = [DownloadPart(str(folder), a, min(a + step, shards), cfg.to_dict()) for a in range(0, shards, step)]
    return [p for p in parts if not set(range(p.first_shard, p.end_shard)) <= done]


def download_part(part: DownloadPart) -> dict[str, Any]:
    """Download one part (wherever this runs) and move its finished shards into the round folder. Returns
    {"part", "host", "pid"}: who did it."""

    cfg = DownloadConfig(**part.cfg)
    folder = Path(part.round_folder)
    work = folder / PARTS_DIR / f"{part.first_shard:05d}-{part.end_shard - 1:05d}"
    work.mkdir(parents=True, exist_ok=True)
    n = cfg.number_sample_per_shard
    rows = read_parquet(folder / URLS_NAME).slice(part.first_shard * n, (part.end_shard - part.first_shard) * n)
    if not (work / URLS_NAME).exists():
        write_parquet_atomic(work / URLS_NAME, rows)
    payload = {**driver_payload(cfg, work / URLS_NAME, work), "start_shard": part.first_shard}
    log.info("download: part %s (%d urls) on %s pid %d", part.name, rows.num_rows, socket.gethostname(), os.getpid())
    run_img2dataset(payload, cfg, work / "img2dataset.log", rows.num_rows)
    _adopt_finished_shards(work, folder)
    return {"part": part.name, "host": socket.gethostname(), "pid": os.getpid()}


def _adopt_finished_shards(work: Path, folder: Path) -> None:
    """Move the part's finished shards into the round (stats file last); a shard the round already has (a part
    that was redone) is left out. Then the part folder goes."""
    for shard in staging_shards(work):
        if (folder / f"{shard}_stats.json").exists():
            continue
        for suffix in SHARD_SUFFIXES:
            os.replace(work / f"{shard}{suffix}", folder / f"{shard}{suffix}")
    shutil.rmtree(work)
    with contextlib.suppress(OSError):
        (folder / PARTS_DIR).rmdir()  # when no other part is running


@contextlib.contextmanager
def dask_parts(address: str | None = None, n_workers: int = 2) -> Iterator[DaskParts]:
    """A PartRunner on Dask: the scheduler at `address`, or a LocalCluster of `n_workers` single-thread worker
    processes for the block. Parts are spread over the workers (each may run on another when its own is gone);
    a part whose worker dies is retried elsewhere (Dask's allowed failures)."""
    from distributed import Client, LocalCluster  # only when a Dask download is asked for

    cluster = None if address else LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None)
    client = Client(address or cluster)
    try:
        yield DaskParts(client)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class DaskParts:
    """PartRunner on a Dask client: one task per part, spread over the workers (and allowed to run elsewhere)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @staticmethod
    def key(part: DownloadPart) -> str:
        return f"download-part-{part.name}-{os.getpid()}"

    def __call__(self, parts: list[DownloadPart]) -> list[dict[str, Any]]:
        workers = sorted(self.client.scheduler_info()["workers"])
        futures = [self.client.submit(download_part, part, key=self.key(part), pure=False,
                                      workers=[workers[i % len(workers)]], allow_other_workers=True, retries=2)
                   for i, part in enumerate(parts)]
        return self.client.gather(futures)
