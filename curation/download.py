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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.diskspace import disk_full_as_one_line, warn_if_short
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
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REDIRECTS,
    FetchPolicy,
    is_transient,
    parse_networks,
    reason_of,
)
from curation.imaging import DEFAULT_MAX_PIXELS, IMAGING_VERSION
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

RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
DISTRIBUTORS = ("multiprocessing",)
# img2dataset's other distributors: neither package is installed nor tested here. Refused when the config is read.
CLUSTER_DISTRIBUTORS = ("pyspark", "ray")
# The embedded sample's reserved host (curation.sample.SAMPLE_HOST): the only host `http_proxy` serves by default.
SAMPLE_PROXY_HOSTS = ("cc4m-sample.invalid",)
# Arguments the stage itself owns: overriding them through `extra_img2dataset_args` would break the contract.
RESERVED_ARGS = frozenset({
    "url_list", "output_folder", "input_format", "output_format", "url_col", "caption_col", "save_additional_columns",
    "incremental_mode", "enable_wandb", "image_size", "resize_mode", "processes_count", "thread_count", "timeout",
    "retries", "number_sample_per_shard", "encode_quality", "distributor", "encode_format", "compute_hash",
})
# img2dataset's cv2 resizer options that curation.imaging (the one decoder of every route) does not implement.
UNSUPPORTED_ARGS = frozenset({
    "resize_only_if_bigger", "upscale_interpolation", "downscale_interpolation", "skip_reencode",
    "disable_all_reencoding", "bbox_col",
})


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings plus the guard and caps (curation.fetch).

    `allowed_networks`: CIDRs the address guard lets through (default none: only globally routable addresses).
    `max_bytes`: response size cap; `max_pixels`: decoded pixel cap, read from the header; `max_seconds`: deadline of
    one whole fetch, redirects included; `timeout`: per socket operation.
    `http_proxy` (the embedded sample's local server) serves only `proxy_hosts`, reserved `.invalid` names.
    `retry_transient`: a rerun of a finished download fetches the transient failures again, while a sample has had
    fewer than `max_attempts` rounds. `extra_img2dataset_args` are passed through verbatim (e.g.
    {"min_image_size": 64}), except the RESERVED_ARGS and UNSUPPORTED_ARGS."""

    image_size: int = 256
    resize_mode: str = "border"
    processes_count: int = 1
    thread_count: int = 32
    timeout: int = 10
    retries: int = 0
    number_sample_per_shard: int = 1000
    encode_quality: int = 95
    distributor: str = "multiprocessing"
    shards_per_part: int = 4
    http_proxy: str | None = None
    proxy_hosts: tuple[str, ...] = SAMPLE_PROXY_HOSTS
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_seconds: float = 60.0
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    retry_transient: bool = False
    max_attempts: int = 3
    subprocess_timeout_s: float | None = None
    stall_timeout_s: float = 1800.0
    progress_interval_s: float = 5.0
    extra_img2dataset_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("image_size", "processes_count", "thread_count", "timeout", "number_sample_per_shard",
                    "max_bytes", "max_pixels", "max_attempts", "shards_per_part")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DownloadConfig.{name} must be a positive int, got {value!r}")
        for name in ("retries", "max_redirects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DownloadConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("max_seconds", "progress_interval_s", "stall_timeout_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"DownloadConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.retry_transient, bool):
            raise ValueError(  # noqa: TRY004 - the team contract: every config error is a ValueError
                f"DownloadConfig.retry_transient must be true or false, got {self.retry_transient!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"DownloadConfig.encode_quality must be in 1..100, got {self.encode_quality!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"DownloadConfig.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.distributor in CLUSTER_DISTRIBUTORS:
            raise ValueError(f"DownloadConfig.distributor {self.distributor!r} is not supported (not installed, not "
                             f"tested); to download on a cluster, run the build flow with task_runner='dask' "
                             f"(dask_address=tcp://scheduler:8786): each download part runs on a Dask worker")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"DownloadConfig.distributor must be one of {DISTRIBUTORS}, got {self.distributor!r}")
        if self.http_proxy is not None and not str(self.http_proxy).startswith("http://"):
            raise ValueError(f"DownloadConfig.http_proxy must be an http://host:port URL or None, got "
                             f"{self.http_proxy!r}")
        if self.subprocess_timeout_s is not None and self.subprocess_timeout_s <= 0:
            raise ValueError("DownloadConfig.subprocess_timeout_s must be positive or None")
        for name in ("allowed_networks", "proxy_hosts"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"DownloadConfig.{name} must be a list of strings, got {value!r}")  # noqa: TRY004
            object.__setattr__(self, name, tuple(value))
        parse_networks(self.allowed_networks)  # a typo fails here, before any work
        self.fetch_policy()  # validates proxy and proxy_hosts
        extra = dict(self.extra_img2dataset_args or {})
        clash = sorted(set(extra) & RESERVED_ARGS)
        if clash:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args may not set {clash}: use the config fields")
        unsupported = sorted(set(extra) & UNSUPPORTED_ARGS)
        if unsupported:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args: {unsupported} are img2dataset resizer options "
                             "that cc4m's decoder (curation.imaging) does not implement")
        try:
            json.dumps(extra)
        except TypeError as err:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args must be JSON-serialisable: {err}") from None
        object.__setattr__(self, "extra_img2dataset_args", MappingProxyType(extra))

    def __hash__(self) -> int:  # MappingProxyType is unhashable; hash its sorted items instead
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["extra_img2dataset_args"] = dict(self.extra_img2dataset_args)
        d["allowed_networks"] = list(self.allowed_networks)
        d["proxy_hosts"] = list(self.proxy_hosts)
        return d

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(allowed_networks=self.allowed_networks, max_bytes=self.max_bytes, timeout=self.timeout,
                           max_seconds=self.max_seconds, max_redirects=self.max_redirects, proxy=self.http_proxy,
                           proxy_hosts=self.proxy_hosts)

    def staging_fingerprint(self) -> dict[str, Any]:
        """Settings that change what lands in staging/ (proxy, parallelism, distributor and retries do not)."""
        return {
            "imaging": IMAGING_VERSION, "image_size": self.image_size, "resize_mode": self.resize_mode,
            "encode_quality": self.encode_quality,
            "number_sample_per_shard": self.number_sample_per_shard, "extra": dict(self.extra_img2dataset_args),
            "guard": {"allowed_networks": list(self.allowed_networks), "max_bytes": self.max_bytes,
                      "max_pixels": self.max_pixels, "max_seconds": self.max_seconds,
                      "max_redirects": self.max_redirects, "proxy_hosts": list(self.proxy_hosts)},
        }

    def img2dataset_kwargs(self, url_list: Path, output_folder: Path) -> dict[str, Any]:
        return {
            "url_list": str(url_list), "output_folder": str(output_folder), "input_format": "parquet",
            "url_col": "url", "caption_col": "caption", "save_additional_columns": ["sample_id"],
            "output_format": "webdataset", "incremental_mode": "incremental", "enable_wandb": False,
            "image_size": self.image_size, "resize_mode": self.resize_mode, "processes_count": self.processes_count,
            "thread_count": self.thread_count, "timeout": self.timeout, "retries": self.retries,
            "number_sample_per_shard": self.number_sample_per_shard, "encode_quality": self.encode_quality,
            "encode_format": "jpg", "compute_hash": "sha256", "distributor": self.distributor,
            **dict(self.extra_img2dataset_args),
        }


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
