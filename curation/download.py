"""Download stage: selected/* -> staging/ (img2dataset, in a subprocess) -> downloads.parquet.

The download's parts, by job: this module is the stage (its config, the order of the rounds, downloads.parquet);
`curation.download_rounds` starts and resumes the rounds; `curation.download_driver` runs img2dataset in a
subprocess (`python -m curation.download_driver <json>`: img2dataset's `spawn` pool and heavy imports stay out of
the build's process); `curation.staging` reads the staging folder back (verify, dedup, reshard and the manifest
use it); `curation.import_standins` keeps img2dataset's unused heavy imports out of the download processes.

What runs there is img2dataset with two parts swapped (`curation.download_worker`): the fetch is the guarded fetcher
(`curation.fetch`: http/https only, address guard on every connection and redirect hop, size cap, whole-transfer
deadline) and the decoder is `curation.imaging.to_stored_jpeg` (pixel cap from the header, EXIF-upright, resized).

Why our own sample_id: img2dataset's keys depend on the shard size and tar members come in completion order, so
`sample_id` rides along via `save_additional_columns` and every mapping goes through the staging parquets.

Failures are classified (`curation.fetch`): every failed row has a `reason` (blocked_address, http_404, timeout,
too_large, too_many_pixels, undecodable, ...) and `transient` (timeouts, resets, 408/425/429, 5xx: may pass later).
With `retry_transient`, a rerun of a finished download fetches the transient failures again into a new round
(`staging/retry-NNNN/`), up to `max_attempts` per sample; `attempts`, `first_attempt_at` and `last_attempt_at`
record it (an attempt = one round that fetched the sample; a round makes up to 1 + `retries` requests for a
transient failure). downloads.parquet is always recomputed from staging/ and its rounds, latest round winning.

downloads.parquet's `sha256` is the hash of the ORIGINAL downloaded bytes (provenance; before resizing);
`stored_sha256` / `stored_phash` are the stored JPEG's, made by the workers (dedup uses them; kept.parquet and the
shards' meta carry the stored sha256 on).

Nothing is lost silently: downloads.parquet has exactly one row per selected sample. Rows img2dataset never reported
(e.g. a shard that failed all its retries) get status "missing" with an error message.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.diskspace import disk_full_as_one_line, warn_if_short
from curation.download_config import (  # noqa: F401 - re-exported: the stage's settings
    CLUSTER_DISTRIBUTORS,
    DISTRIBUTORS,
    RESERVED_ARGS,
    RESIZE_MODES,
    SAMPLE_PROXY_HOSTS,
    UNSUPPORTED_ARGS,
    DownloadConfig,
)
from curation.download_driver import Progress
from curation.download_parts import PartRunner
from curation.download_rounds import (
    discard_other_settings,
    new_round,
    not_yet_fetched,
    resume_unfinished,
    retry_candidates,
)
from curation.fetch import (
    is_transient,
    reason_of,
)
from curation.io import fingerprint_of, read_parquet, table_digest, write_parquet_atomic
from curation.staging import (
    DOWNLOADS_META_KEY,
    DOWNLOADS_SCHEMA,
    MISSING_MESSAGE,
    STATUSES,
    STORED_HASH_COLUMNS,
    URLS_NAME,
    merge_rounds,
    staging_rounds,
)
from manifests.layout import BuildLayout

log = logging.getLogger(__name__)

def collect_selected(build_dir: str | Path) -> pa.Table:
    """sample_id, url, caption of every selected sample, in sample_id order (sample ids must be unique)."""
    layout = BuildLayout(Path(build_dir))
    parts = layout.parts(layout.selected_dir)
    if not parts:
        raise FileNotFoundError(f"download: no selected parts in {layout.selected_dir} (run select first)")
    table = pa.concat_tables(read_parquet(p, columns=["sample_id", "url", "caption"]) for p in parts)
    table = table.sort_by("sample_id")
    ids = table["sample_id"].to_numpy()
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise ValueError("download: duplicate sample_id across selected parts")
    return table.cast(pa.schema([("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string())]))


def download_selected(build_dir: str | Path, cfg: DownloadConfig, progress: Progress | None = None,
                      parts: PartRunner | None = None) -> dict[str, Any]:
    """selected/* -> staging/ -> downloads.parquet (one row per selected sample). Idempotent, resumable
    (img2dataset's incremental mode continues a round from its finished staging shards) and incremental: selected
    rows that no round has asked for yet (a grown source) are fetched in a new round, and only they. With
    cfg.retry_transient, a finished download fetches its transient failures again (a new round). `progress` is
    called with {"stage": "download", "done", "total", "unit": "images", "rate", "eta_s"} while img2dataset runs.
    Returns counts by status and reason.

    `parts` (curation.download_parts, e.g. `dask_parts`): run each round as parts of whole shards by that runner
    (on Dask workers) instead of one img2dataset here; the result's `download_workers` lists who ran each part
    ({"part", "host", "pid"}; empty when nothing was downloaded by parts). The staging layout is the same."""
    layout = BuildLayout(Path(build_dir))
    run = _Run(progress, parts, [])
    with disk_full_as_one_line(layout.root):
        return {**_download(layout, cfg, run), "download_workers": run.workers}


@dataclass
class _Run:
    """How this run downloads (progress callback, part runner) and who ran its parts."""

    progress: Progress | None
    parts: PartRunner | None
    workers: list[dict[str, Any]]


def _download(layout: BuildLayout, cfg: DownloadConfig, run: _Run) -> dict[str, Any]:
    staging = layout.staging_dir
    urls = collect_selected(layout.root)
    fingerprint = fingerprint_of({"urls": table_digest(urls), "staging": cfg.staging_fingerprint()})

    if layout.downloads.exists():
        meta = (pq.read_schema(layout.downloads).metadata or {}).get(DOWNLOADS_META_KEY)
        recorded = json.loads(meta) if meta else {}
        # "missing" rows mean img2dataset gave up on a shard: a rerun retries just those shards (incremental mode).
        if recorded.get("fingerprint") == fingerprint and recorded["counts"].get("missing", 0) == 0:
            retry = retry_candidates(layout, cfg)
            if retry.num_rows == 0:
                return {**recorded["counts"], "skipped": True}
            return _retry_round(layout, urls, retry, cfg, fingerprint, run)

    discard_other_settings(layout, cfg)
    staging.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    resume_unfinished(staging, cfg, run.progress, run.parts, run.workers)
    new = not_yet_fetched(staging, urls)
    warn_if_short(layout.root, new.num_rows, cfg.image_size)
    if new.num_rows or not (staging / URLS_NAME).exists():
        run.workers += new_round(staging, new, cfg, run.progress, "selected rows not fetched yet", run.parts)
    result = _finish(layout, urls, cfg, fingerprint, time.perf_counter() - started)
    # Shards a killed build finished while its proxy was already gone: fetch their rows again now, once.
    own = retry_candidates(layout, replace(cfg, retry_transient=False))
    if own.num_rows:
        return _retry_round(layout, urls, own, cfg, fingerprint, run)
    return result


def _finish(layout: BuildLayout, urls: pa.Table, cfg: DownloadConfig, fingerprint: str,
            seconds: float) -> dict[str, Any]:
    counts = _collect(layout, urls, cfg, seconds)
    table = counts.pop("_table")
    meta = {DOWNLOADS_META_KEY: json.dumps({"fingerprint": fingerprint, "counts": counts}, sort_keys=True).encode()}
    write_parquet_atomic(layout.downloads, table.replace_schema_metadata(meta))
    return {**counts, "skipped": False}


def _retry_round(layout: BuildLayout, urls: pa.Table, retry: pa.Table, cfg: DownloadConfig, fingerprint: str,
                 run: _Run) -> dict[str, Any]:
    """Fetch the transient failures again in a new round staging/retry-NNNN/ (an unfinished round is resumed
    first, and then counts as this run's round)."""
    started = time.perf_counter()
    if not resume_unfinished(layout.staging_dir, cfg, run.progress, run.parts, run.workers):
        subset = urls.filter(pc.is_in(urls["sample_id"], value_set=retry["sample_id"]))
        run.workers += new_round(layout.staging_dir, subset, cfg, run.progress, "transient failures to retry",
                                 run.parts)
    return _finish(layout, urls, cfg, fingerprint, time.perf_counter() - started)


def _collect(layout: BuildLayout, urls: pa.Table, cfg: DownloadConfig, seconds: float) -> dict[str, Any]:
    """Join every finished staging shard of every round onto the selected urls (vectorised: CC12M-sized inputs)."""
    per_shard: list[dict[str, Any]] = []
    joined = merge_rounds(layout, urls, per_shard)
    raw_status = joined["status"]
    missing = pc.is_null(raw_status)
    known = pc.is_in(raw_status, value_set=pa.array(STATUSES[:3]))
    status = pc.if_else(missing, "missing", pc.if_else(known, raw_status, "failed_to_download"))
    success = pc.equal(status, "success")
    null_str = pa.scalar(None, pa.string())
    error = pc.if_else(success, null_str, pc.if_else(
        missing, MISSING_MESSAGE, pc.coalesce(joined["error_message"], "other: img2dataset gave no error message")))
    reasons = [None if e is None else reason_of(e) for e in error.to_pylist()]
    reason = pa.array(reasons, pa.string())
    transient = pa.array([None if r is None else is_transient(r) for r in reasons], pa.bool_())
    null_int = pa.scalar(None, pa.int32())
    table = pa.table({
        "sample_id": joined["sample_id"], "url": joined["url"], "status": status, "reason": reason,
        "transient": transient, "error_message": error,
        "width": pc.if_else(success, joined["width"], null_int),
        "height": pc.if_else(success, joined["height"], null_int),
        "sha256": pc.if_else(success, joined["sha256"], null_str),
        "attempts": joined["attempts"], "first_attempt_at": joined["first_attempt_at"],
        "last_attempt_at": joined["attempt_at"],
        "staging_shard": joined["staging_shard"], "staging_key": joined["key"],
        **{name: pc.if_else(success, joined[name], pa.scalar(None, DOWNLOADS_SCHEMA.field(name).type))
           for name in STORED_HASH_COLUMNS},
    }, schema=DOWNLOADS_SCHEMA)

    status_counts = Counter(table["status"].to_pylist())
    reason_counts = Counter(r for r in reasons if r is not None)
    errors = Counter(e for e in table["error_message"].to_pylist() if e)
    layout_counts = {s: status_counts.get(s, 0) for s in STATUSES}
    counts = {
        "selected": urls.num_rows,
        **layout_counts,
        "failed": urls.num_rows - layout_counts["success"],
        "failed_by_reason": dict(sorted(reason_counts.items())),
        "failed_by_status": {s: layout_counts[s] for s in STATUSES[1:]},
        "transient": sum(1 for r in reasons if r is not None and is_transient(r)),
        "errors": dict(errors.most_common(50)),
        "rounds": len(staging_rounds(layout.staging_dir)),
        "staging_shards": per_shard,
        "download_seconds": round(seconds, 3),
        "settings": {"image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
                     "processes_count": cfg.processes_count, "thread_count": cfg.thread_count},
    }
    if table.num_rows != urls.num_rows or counts["selected"] != sum(layout_counts.values()) \
            or counts["failed"] != sum(reason_counts.values()):
        raise AssertionError(f"download: counts do not add up: {counts}")
    counts["_table"] = table
    return counts
