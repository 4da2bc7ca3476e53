"""The download's rounds: the first round fetches the selected rows, later rounds (`staging/retry-NNNN/`) fetch the
rows a grown source added and the failures to fetch again. A round killed half-way is resumed (img2dataset's
incremental mode keeps its finished shards). Reading the rounds back is `curation.staging`'s job.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.download_config import DownloadConfig
from curation.download_driver import Progress, driver_payload, run_img2dataset
from curation.download_parts import PartRunner, plan_parts
from curation.fetch import OWN_FAILURE_REASONS
from curation.io import read_parquet, write_parquet_atomic
from curation.staging import DOWNLOADS_META_KEY, LOG_NAME, RETRY_PREFIX, URLS_NAME, staging_rounds, staging_shards
from manifests.layout import BuildLayout

log = logging.getLogger(__name__)


def _write_round_urls(path: Path, urls: pa.Table, cfg: DownloadConfig) -> None:
    meta = {DOWNLOADS_META_KEY: json.dumps({"staging": cfg.staging_fingerprint()}, sort_keys=True).encode()}
    write_parquet_atomic(path, urls.replace_schema_metadata(meta))


def _round_staging(path: Path) -> Any:
    old = (pq.read_schema(path).metadata or {}).get(DOWNLOADS_META_KEY)
    return json.loads(old).get("staging") if old else None


def round_folders(staging: Path) -> list[Path]:
    """Every round that was started (its urls.parquet written), in order."""
    return [staging / r for r in staging_rounds(staging) if (staging / r / URLS_NAME).exists()]


def round_done(folder: Path, cfg: DownloadConfig) -> bool:
    rows = pq.read_metadata(folder / URLS_NAME).num_rows
    return len(staging_shards(folder)) >= -(-rows // cfg.number_sample_per_shard)


def run_round(folder: Path, urls: pa.Table, cfg: DownloadConfig, log_path: Path, progress: Progress | None,
              parts: PartRunner | None = None) -> list[dict[str, Any]]:
    """img2dataset over urls (written to folder/urls.parquet already) unless every shard of the round is done: in
    this process's subprocess, or as parts run by `parts` (curation.download_parts). Returns who ran the parts."""
    if not urls.num_rows or round_done(folder, cfg):
        return []
    log.info("download: %d urls in %s, %d staging shards already done", urls.num_rows, folder,
             len(staging_shards(folder)))
    if parts is None:
        run_img2dataset(driver_payload(cfg, folder / URLS_NAME, folder), cfg, log_path, urls.num_rows, progress)
        return []
    return parts(plan_parts(folder, urls.num_rows, cfg))


def resume_unfinished(staging: Path, cfg: DownloadConfig, progress: Progress | None,
                      parts: PartRunner | None = None, workers: list[dict[str, Any]] | None = None) -> bool:
    """Finish every round a killed build left unfinished (img2dataset's incremental mode); True if any ran.
    Who ran the parts is appended to `workers`."""
    ran = False
    for folder in round_folders(staging):
        if not round_done(folder, cfg):
            ran_by = run_round(folder, read_parquet(folder / URLS_NAME), cfg, staging / LOG_NAME, progress, parts)
            if workers is not None:
                workers += ran_by
            ran = True
    return ran


def not_yet_fetched(staging: Path, urls: pa.Table) -> pa.Table:
    """Selected (sample_id, url) pairs no round has asked for: the rows a grown or edited source added. A sample
    whose url changed counts as new; samples no longer selected are simply not asked for again."""
    folders = round_folders(staging)
    if not folders:
        return urls
    asked = pa.concat_tables(read_parquet(f / URLS_NAME, columns=["sample_id", "url"]) for f in folders)
    return urls.join(asked, keys=["sample_id", "url"], join_type="left anti").sort_by("sample_id")


def new_round(staging: Path, rows: pa.Table, cfg: DownloadConfig, progress: Progress | None, why: str,
              parts: PartRunner | None = None) -> list[dict[str, Any]]:
    folder = staging if not (staging / URLS_NAME).exists() else \
        staging / f"{RETRY_PREFIX}{len(staging_rounds(staging)):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_round_urls(folder / URLS_NAME, rows, cfg)
    log.info("download: %d %s in %s", rows.num_rows, why, folder.name)
    return run_round(folder, rows, cfg, staging / LOG_NAME, progress, parts)


def discard_other_settings(layout: BuildLayout, cfg: DownloadConfig) -> None:
    """Rounds fetched with other image settings would mix two kinds of staged image: start over."""
    first = layout.staging_dir / URLS_NAME
    if first.exists() and _round_staging(first) != cfg.staging_fingerprint():
        log.warning("download: image settings changed, discarding %s", layout.staging_dir)
        shutil.rmtree(layout.staging_dir)
        layout.downloads.unlink(missing_ok=True)


def retry_candidates(layout: BuildLayout, cfg: DownloadConfig) -> pa.Table:
    """Failures to fetch again: the build's own (proxy_unreachable) always; with retry_transient, the transient ones
    while a sample has had fewer than max_attempts rounds."""
    table = read_parquet(layout.downloads, columns=["sample_id", "status", "reason", "transient", "attempts"])
    failed = pc.not_equal(table["status"], "success")
    own = pc.is_in(table["reason"], value_set=pa.array(sorted(OWN_FAILURE_REASONS)))
    mask = pc.and_(failed, pc.fill_null(own, False))
    if cfg.retry_transient:
        transient = pc.and_(pc.fill_null(table["transient"], False), pc.less(table["attempts"], cfg.max_attempts))
        mask = pc.or_(mask, pc.and_(failed, transient))
    return table.filter(mask).select(["sample_id"])
